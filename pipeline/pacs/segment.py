"""One series from the PACS and back: retrieve (WADO-RS), segment as ``predict`` does, store the SEG and SR (STOW-RS),
and on request an RTSTRUCT of AUTOMATIC ROIs for a treatment-planning system.

The retrieved images live only in a temporary folder that is removed afterwards,
whatever happens; nothing from their headers is logged or written anywhere but into
the DICOM SEG and SR, which belong in the patient's study. The SEG is built by the same
code as ``predict``'s (same preprocessing, settings, postprocessing); beside it goes a
DICOM SR (TID 1500) with each segment's volume and estimated Dice. Both are stored into
the same study, then looked up again with QIDO-RS before the SEG's SOP Instance UID is
reported (some servers answer a STOW with success without storing).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data import Staged
from pipeline.inference import (
    Algorithm,
    Predictor,
    measurements_of,
    review_of,
    write_dicom_rtstruct,
    write_dicom_seg,
    write_dicom_sr,
    write_label_map,
)
from pipeline.pacs.client import PacsClient
from pipeline.pacs.series import SeriesSummary
from pipeline.quality import write_record


@dataclass
class SegmentedSeries:
    """What one PACS round trip produced.

    Args:
        study_uid: the study.
        series_uid: the segmented series.
        seg_sop_instance_uid: the stored SEG's SOP Instance UID.
        local_files: copies kept on request (``--out``), named by the series UID.
        sr_sop_instance_uid: the stored SR's SOP Instance UID.
        record: the case record (volumes, estimated Dice, flag and reasons).
        rtstruct_sop_instance_uid: the stored RTSTRUCT's SOP Instance UID ("" when none was asked for).
    """

    study_uid: str
    series_uid: str
    seg_sop_instance_uid: str
    local_files: list[Path]
    sr_sop_instance_uid: str = ""
    record: dict[str, Any] = field(default_factory=dict)
    rtstruct_sop_instance_uid: str = ""


def segment_series(
    client: PacsClient, predictor: Predictor, algorithm: Algorithm, study_uid: str, series: SeriesSummary,
    keep_in: Path | None = None, rtstruct: bool = False,
) -> SegmentedSeries:
    """Retrieve a series, segment it, store the DICOM SEG into its study and confirm it is there.

    Args:
        client: the PACS.
        predictor: the model(s), with their stored settings.
        algorithm: the model's identity (SEG algorithm identification and series description).
        study_uid: the study.
        series: the series to segment.
        keep_in: also keep the NIfTI mask, the SEG, the SR and the case record here (named by the series UID).
        rtstruct: also store (and keep) an RTSTRUCT of the same classes, its ROIs AUTOMATIC.
    """
    import pydicom

    from transforms.dicom import series_files

    tmp = Path(tempfile.mkdtemp(prefix="unet-pacs-"))
    try:
        folder = tmp / "series"
        client.retrieve_series(study_uid, series.uid, folder)
        loaded = predictor.load([folder])
        result = predictor.predict_loaded(loaded, quality=True)
        names = {v: n for v, n in predictor.labels.items() if v != 0}
        sources = series_files(folder, series.uid)
        seg_path = write_dicom_seg(result.labels, sources, names, algorithm, tmp / "seg.dcm")
        record = predictor.record(series.uid, result, {"name": algorithm.name, "version": algorithm.version},
                                  {"mask": f"{series.uid}.nii.gz", "seg": f"{series.uid}.seg.dcm", "sr": f"{series.uid}.sr.dcm"})
        sr_path = write_dicom_sr(seg_path, sources, measurements_of(record), algorithm, tmp / "sr.dcm",
                                 review=review_of(record))
        seg, sr = pydicom.dcmread(str(seg_path)), pydicom.dcmread(str(sr_path))
        outputs = [(seg_path, ".seg.dcm"), (sr_path, ".sr.dcm")]
        stored = [seg, sr]
        if rtstruct:
            rt_path = write_dicom_rtstruct(result.labels, sources, names, algorithm, tmp / "rtstruct.dcm")
            outputs.append((rt_path, ".rtstruct.dcm"))
            stored.append(pydicom.dcmread(str(rt_path)))
        client.store(stored, study_uid=study_uid)
        kept: list[Path] = []
        if keep_in is not None:
            with Staged() as staged:
                kept.append(write_label_map(result.labels, result.affine, keep_in / f"{series.uid}.nii.gz", staged))
                for source, suffix in outputs:
                    target = keep_in / f"{series.uid}{suffix}"
                    shutil.copyfile(source, staged.path(target, ".dcm"))
                    kept.append(target)
                kept.append(write_record(record, keep_in / f"{series.uid}.json", staged))
        return SegmentedSeries(study_uid, series.uid, str(seg.SOPInstanceUID), kept, str(sr.SOPInstanceUID), record,
                               str(stored[2].SOPInstanceUID) if rtstruct else "")
    finally:
        # The patient's images leave no copy behind, on success or failure.
        shutil.rmtree(tmp, ignore_errors=True)
