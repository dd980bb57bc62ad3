"""The worklist's PACS source: the predictions ``pacs predict`` and ``pacs watch`` stored, read back from their SRs.

Every SR this project wrote (SeriesDescription ``unet-pipeline NAME vVERSION SR``, Manufacturer ``unet-pipeline``)
states the model's name and version, the series it segmented, when, and each structure's volume and estimated
Dice. The newest SR of a series per model is its prediction. A series a reader has corrected since (a SEG or
RTSTRUCT of that series dated after the SR that training takes as a reader's: one that
:attr:`~pipeline.data.dicom_labels.LabelHeader.is_human` holds for, or that a ``data.reader_edit_rules`` rule
recognises, :func:`~pipeline.data.dicom_dataset.edit_rule`) is done and left out. The SRs and labels are
retrieved into a temporary folder removed afterwards; nothing of their headers but UIDs, dates, algorithm types,
the edit rules' attributes (matched, never shown) and the model's identity is read, and nothing is logged but
counts.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from pipeline.data import LabelHeader, LabelProblem, edit_rule, read_label_header
from pipeline.inference import PredictionReport, read_prediction_report
from pipeline.pacs.client import PacsClient
from pipeline.quality import WorkItem, dicom_time

logger = logging.getLogger(__name__)

#: How this project's SEG and SR series descriptions start (``unet-pipeline NAME vVERSION``).
OWN_DESCRIPTION = "unet-pipeline "
_LABEL_MODALITIES = ("SEG", "RTSTRUCT")


def pacs_items(client: PacsClient, model: str | None = None,
               edit_rules: list[dict[str, str]] | None = None) -> list[WorkItem]:
    """The newest prediction of each series and model on the PACS, without the series a reader corrected since.

    Args:
        client: the PACS.
        model: only this model's SRs (``None``: every model's).
        edit_rules: ``data.reader_edit_rules``: AUTOMATIC labels they match are readers' edits too.

    Raises:
        PacsUnavailableError, PacsAuthError: the PACS is down or refuses the credentials.
        InputDataError: an SR of this project that cannot be read.
    """
    latest: dict[tuple[str, str, str], WorkItem] = {}
    with tempfile.TemporaryDirectory(prefix="unet-worklist-") as tmp:
        for n, (study_uid, series) in enumerate(client.find_series("SR")):
            if not series.description.startswith(OWN_DESCRIPTION):
                continue  # another system's report: not a prediction of ours (and not worth retrieving)
            for path in client.retrieve_series(study_uid, series.uid, Path(tmp) / f"sr{n}"):
                report = read_prediction_report(path)
                path.unlink()
                if report is None or (model is not None and report.model_name != model):
                    continue
                item = _item(report)
                key = (report.study_uid, report.series_uid, report.model_name)
                kept = latest.get(key)
                if kept is None or (item.when or 0.0) > (kept.when or 0.0):
                    latest[key] = item
        corrected = _reader_labels(client, {study for study, _, _ in latest}, Path(tmp), edit_rules)
    items = []
    for (study, series, _), item in sorted(latest.items()):
        times = corrected.get((study, series), [])
        if any(t is not None and item.when is not None and t > item.when for t in times):
            continue  # a reader's label newer than the prediction: corrected, off the list
        items.append(item)
    logger.info("worklist: %d prediction(s) on the PACS, %d left after readers' corrections", len(latest), len(items))
    return items


def _item(report: PredictionReport) -> WorkItem:
    if report.review is not None:  # the case record's own flag and reasons
        flagged, reasons = report.review.flagged, report.review.reasons
    else:  # an SR written before it stated them: a withheld estimate is a flag (the record flags it first)
        withheld = sorted({str(m["estimate_withheld"]) for m in report.segments.values() if m.get("estimate_withheld")})
        flagged, reasons = bool(withheld), tuple(f"no estimated Dice (the SR says: {w})" for w in withheld)
    return WorkItem(
        case=report.series_uid, study_instance_uid=report.study_uid, series_instance_uid=report.series_uid,
        model_name=report.model_name, model_version=report.model_version,
        flagged=flagged, reasons=reasons,
        estimates={name: m.get("estimated_dice") for name, m in report.segments.items()},
        volumes_ml={name: float(m.get("volume_ml") or 0.0) for name, m in report.segments.items()},
        when=dicom_time(report.when),
    )


def is_reader_label(header: LabelHeader, edit_rules: list[dict[str, str]] | None = None) -> bool:
    """Whether training would take a label object as a reader's: every segment or ROI MANUAL or SEMIAUTOMATIC, or
    an AUTOMATIC one that a ``data.reader_edit_rules`` rule recognises (never this project's own output).

    Args:
        header: the label object's header.
        edit_rules: ``data.reader_edit_rules``.
    """
    return header.is_human or edit_rule(header, edit_rules) is not None


def _reader_labels(client: PacsClient, studies: set[str], tmp: Path,
                   edit_rules: list[dict[str, str]] | None) -> dict[tuple[str, str], list[float | None]]:
    """(study, image series) -> the dates of the readers' labels (SEG or RTSTRUCT) of that series in ``studies``."""
    found: dict[tuple[str, str], list[float | None]] = {}
    if not studies:
        return found
    for modality in _LABEL_MODALITIES:
        for n, (study_uid, series) in enumerate(client.find_series(modality)):
            if study_uid not in studies:
                continue
            for path in client.retrieve_series(study_uid, series.uid, tmp / f"{modality.lower()}{n}"):
                try:
                    header = read_label_header(path)
                except LabelProblem:
                    header = None
                path.unlink()
                # The project's own rule of a reader's label, as training applies it.
                if header is not None and header.series_uid and is_reader_label(header, edit_rules):
                    found.setdefault((study_uid, header.series_uid), []).append(dicom_time(header.when))
    return found
