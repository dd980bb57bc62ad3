"""The PACS as this project's inference sees it: a DICOMweb server whose SEGs are told apart by the model that made them.

Searching, retrieving and storing are :class:`pipeline.dicomweb.DicomWebClient`'s; this adds what
needs the model's identity: the SeriesDescription tag of a model version's SEGs and the search for them.
"""

from __future__ import annotations

from pipeline.dicomweb import DicomWebClient, redact_url
from pipeline.errors import ConfigError
from pipeline.inference import seg_series_description
from pipeline.pacs.series import SegInstance

__all__ = ["PacsClient", "model_tag", "redact_url"]

_LO_MAX = 64  # SeriesDescription is an LO: 64 characters, no backslash


def model_tag(name: str, version: str | int) -> str:
    """The SeriesDescription that marks a SEG as made by one model version: ``unet-pipeline NAME vVERSION``.

    A watch pass compares it exactly, so every SEG of that version must carry it unchanged.

    Args:
        name: the registered model name.
        version: the model version.
    """
    tag = seg_series_description(name, version)
    if len(tag) > _LO_MAX or "\\" in tag or any(ord(c) < 32 for c in tag):
        # A PACS would truncate or refuse it, and the watch would never recognise its own SEGs.
        raise ConfigError(f"model tag {tag!r}: a SeriesDescription holds at most {_LO_MAX} characters, "
                          "without backslash or control characters")
    return tag



class PacsClient(DicomWebClient):
    """A DICOMweb PACS (see :class:`pipeline.dicomweb.DicomWebClient`) and the SEGs our models stored in it.

    Args:
        url: the DICOMweb root, e.g. ``https://pacs.example.org/dicom-web``; no credentials in it.
        verify_tls: verify the server's certificate (on unless explicitly turned off).
        timeout_s: connect and read timeout of each request, in seconds.
        confirm_timeout_s: how long :meth:`store` waits for stored instances to show up in QIDO-RS.
    """

    def __repr__(self) -> str:
        return f"PacsClient({self.safe_url!r})"

    def seg_series_for(self, study_uid: str) -> list[SegInstance]:
        """The DICOM SEG instances of a study, with their series' description.

        Args:
            study_uid: the StudyInstanceUID.
        """
        segs = []
        for series in self.list_series(study_uid, modality="SEG"):
            sops = sorted(self._instance_uids(study_uid, series.uid))
            segs.extend(SegInstance(series.uid, sop, series.description) for sop in sops)
        return segs

    def seg_from_model(self, study_uid: str, tag: str) -> str | None:
        """The SOPInstanceUID of a SEG in the study whose SeriesDescription is ``tag`` exactly, or ``None``.

        Args:
            study_uid: the StudyInstanceUID.
            tag: the model's tag (:func:`model_tag`).
        """
        for seg in self.seg_series_for(study_uid):
            if seg.series_description == tag:
                return seg.sop_instance_uid
        return None
