"""What the PACS holds, in summaries without patient identifiers, and the rules that pick the series to segment.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.dicomweb import SeriesSummary
from pipeline.errors import ConfigError, InputDataError


@dataclass(frozen=True)
class SegInstance:
    """One DICOM SEG instance stored in a study.

    Args:
        series_uid: its SeriesInstanceUID.
        sop_instance_uid: its SOPInstanceUID.
        series_description: its series' SeriesDescription (our SEGs carry :func:`model_tag` there).
    """

    series_uid: str
    sop_instance_uid: str
    series_description: str


#: Modalities of series that hold no images to segment (segmentations, reports, presentation states...).
NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTDOSE", "REG", "DOC"})


@dataclass(frozen=True)
class SeriesRules:
    """How to pick the series to segment in a study when no SeriesInstanceUID is given.

    Args:
        modality: the Modality required (case-insensitive), or ``None`` for any.
        description_pattern: a regular expression searched in SeriesDescription (case-insensitive),
            or ``None`` for any.
        min_slices: the fewest instances a series may hold (localisers and scouts hold few).
    """

    modality: str | None = None
    description_pattern: str | None = None
    min_slices: int = 1

    def __post_init__(self) -> None:
        if self.description_pattern is not None:
            try:
                re.compile(self.description_pattern)
            except re.error as exc:
                raise ConfigError(f"series description pattern {self.description_pattern!r}: {exc}") from None
        if self.min_slices < 1:
            raise ConfigError(f"series min_slices must be at least 1, got {self.min_slices}")

    def matches(self, series: SeriesSummary) -> bool:
        """Whether ``series`` satisfies every rule.

        Args:
            series: the series to test.
        """
        if series.modality.upper() in NON_IMAGE_MODALITIES:
            return False  # our own SEGs, reports, presentation states: never something to segment
        if self.modality and series.modality.upper() != self.modality.upper():
            return False
        if self.description_pattern and not re.search(self.description_pattern, series.description, re.IGNORECASE):
            return False
        return series.num_instances >= self.min_slices

    def describe(self) -> str:
        """The rules in words, for messages."""
        parts = [f"modality {self.modality}"] if self.modality else []
        if self.description_pattern:
            parts.append(f"description matching /{self.description_pattern}/i")
        parts.append(f"at least {self.min_slices} instance{'s' if self.min_slices != 1 else ''}")
        return ", ".join(parts)


def _listing(series: Sequence[SeriesSummary]) -> str:
    return "; ".join(str(s) for s in series) if series else "none"


def matching_series(series: Sequence[SeriesSummary], rules: SeriesRules) -> list[SeriesSummary]:
    """The series that satisfy ``rules``, in the order given.

    Args:
        series: the study's series (from :meth:`PacsClient.list_series`).
        rules: the selection rules.
    """
    return [s for s in series if rules.matches(s)]


def select_series(
    series: Sequence[SeriesSummary], rules: SeriesRules, series_uid: str | None = None, study_uid: str | None = None,
) -> SeriesSummary:
    """The one series to segment: the one with ``series_uid`` when given (the rules are then not applied), else the
    only one that satisfies ``rules``.

    Args:
        series: the study's series (from :meth:`PacsClient.list_series`).
        rules: the selection rules.
        series_uid: an explicit SeriesInstanceUID, or ``None`` to select by the rules.
        study_uid: the study, named in the error message when given.

    Raises:
        InputDataError: the UID is not among ``series``, or no series or several series satisfy the rules;
            the message lists the series found as ``UID (modality, "description", N instances)``.
    """
    where = f"study {study_uid}" if study_uid else "series selection"
    if series_uid is not None:
        for candidate in series:
            if candidate.uid == series_uid:
                return candidate
        raise InputDataError(where, f"no series {series_uid}; series found: {_listing(series)}")
    matches = matching_series(series, rules)
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise InputDataError(where, f"no series with {rules.describe()}; series found: {_listing(series)}")
    raise InputDataError(where, f"{len(matches)} series with {rules.describe()} (give the series UID or narrower "
                                f"rules): {_listing(matches)}")
