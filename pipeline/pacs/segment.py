"""One series from the PACS and back: retrieve (WADO-RS), segment as ``predict`` does, store the SEG (STOW-RS).

The retrieved images live only in a temporary folder that is removed afterwards,
whatever happens; nothing from their headers is logged or written anywhere but into
the DICOM SEG, which belongs in the patient's study. The SEG is built by the same
code as ``predict``'s (same preprocessing, settings, postprocessing), stored into the
same study, then looked up again with QIDO-RS before its SOP Instance UID is
reported (some servers answer a STOW with success without storing).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.data import Staged
from pipeline.inference import Algorithm, Predictor, write_dicom_seg, write_label_map
from pipeline.pacs.client import PacsClient
from pipeline.pacs.series import SeriesSummary


@dataclass
class SegmentedSeries:
    """What one PACS round trip produced.

    Args:
        study_uid: the study.
        series_uid: the segmented series.
        seg_sop_instance_uid: the stored SEG's SOP Instance UID.
        local_files: copies kept on request (``--out``), named by the series UID.
    """

    study_uid: str
    series_uid: str
    seg_sop_instance_uid: str
    local_files: list[Path]


def segment_series(
    client: PacsClient, predictor: Predictor, algorithm: Algorithm, study_uid: str, series: SeriesSummary,
    keep_in: Path | None = None,
) -> SegmentedSeries:
    """Retrieve a series, segment it, store the DICOM SEG into its study and confirm it is there.

    Args:
        client: the PACS.
        predictor: the model(s), with their stored settings.
        algorithm: the model's identity (SEG algorithm identification and series description).
        study_uid: the study.
        series: the series to segment.
        keep_in: also keep the NIfTI mask and the SEG here (named by the series UID).
    """
    import pydicom

    from transforms.dicom import series_files

    tmp = Path(tempfile.mkdtemp(prefix="unet-pacs-"))
    try:
        folder = tmp / "series"
        client.retrieve_series(study_uid, series.uid, folder)
        loaded = predictor.load([folder])
        result = predictor.predict_loaded(loaded)
        names = {v: n for v, n in predictor.labels.items() if v != 0}
        seg_path = write_dicom_seg(result.labels, series_files(folder, series.uid), names, algorithm, tmp / "seg.dcm")
        seg = pydicom.dcmread(str(seg_path))
        client.store([seg], study_uid=study_uid)
        kept: list[Path] = []
        if keep_in is not None:
            with Staged() as staged:
                kept.append(write_label_map(result.labels, result.affine, keep_in / f"{series.uid}.nii.gz", staged))
                target = keep_in / f"{series.uid}.seg.dcm"
                shutil.copyfile(seg_path, staged.path(target, ".dcm"))
                kept.append(target)
        return SegmentedSeries(study_uid, series.uid, str(seg.SOPInstanceUID), kept)
    finally:
        # The patient's images leave no copy behind, on success or failure.
        shutil.rmtree(tmp, ignore_errors=True)
