"""What a DICOMweb server holds, in summaries without patient identifiers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SeriesSummary:
    """One series of a study, as QIDO-RS describes it.

    Args:
        uid: SeriesInstanceUID.
        modality: Modality (``MR``, ``CT``, ``SEG``...), empty when the server gives none.
        description: SeriesDescription, empty when absent.
        num_instances: how many instances the series holds.
    """

    uid: str
    modality: str
    description: str
    num_instances: int

    def __str__(self) -> str:
        return f'{self.uid} ({self.modality or "?"}, "{self.description}", {self.num_instances} instances)'
