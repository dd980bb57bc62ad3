"""Quality: how far to trust each prediction. Volumes, the quality estimate and its calibration, the input check,
the review flag, the case records and the batch report.

Between data and inference in the flow: the inference engine computes the signals
these modules turn into an estimated Dice, a flag and a report, and evaluation fits the
calibration on validation cases. It may import ``pipeline.data`` (and
``pipeline.config``, ``pipeline.errors``), never inference or anything above it, so the
same records and report serve ``predict``, ``evaluate``, ``pacs`` and the MLflow model.
"""

from pipeline.quality.agreement import MaskAgreement, mean_agreement
from pipeline.quality.calibration import WORST_CASES, Calibration, fit_calibration, out_of_sample_estimates
from pipeline.quality.conformity import Conformity, check_conformity
from pipeline.quality.measurements import label_volumes, spacing_mm, voxel_volume_ml
from pipeline.quality.records import (
    add_true_dice,
    case_record,
    estimate_quality,
    read_record,
    review,
    write_record,
    write_summary_csv,
)
from pipeline.quality.report import overlay_thumbnail, write_report
from pipeline.quality.signals import SIGNALS, quality_signals
from pipeline.quality.worklist import WorkItem, Worklist, dicom_time, folder_items, rank

__all__ = [
    "SIGNALS",
    "WORST_CASES",
    "Calibration",
    "Conformity",
    "MaskAgreement",
    "WorkItem",
    "Worklist",
    "add_true_dice",
    "case_record",
    "check_conformity",
    "dicom_time",
    "folder_items",
    "estimate_quality",
    "fit_calibration",
    "label_volumes",
    "mean_agreement",
    "out_of_sample_estimates",
    "overlay_thumbnail",
    "quality_signals",
    "rank",
    "read_record",
    "review",
    "spacing_mm",
    "voxel_volume_ml",
    "write_record",
    "write_report",
    "write_summary_csv",
]
