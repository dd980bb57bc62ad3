"""DICOM SR (TID 1500) of a SEG's segment volumes and estimated Dice, on the real series ``hippocrop_pgbm002``.

A SEG with two segments (one box of known voxel count, one empty) is written on the
series' grid, then the report; what it states is read back with highdicom, and what it
references with highdicom's evidence API and the raw dataset.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage

from pipeline.data import Staged
from pipeline.errors import InputDataError
from pipeline.inference.dicom_seg import Algorithm, write_dicom_seg
from pipeline.inference.dicom_sr import SegmentMeasurement, read_dicom_sr, write_dicom_sr
from tests.conftest import DICOM, dicom_series
from transforms.dicom import series_files

SERIES = "hippocrop_pgbm002"
ALGORITHM = Algorithm("hippo", "3", "unet-pipeline 0.1.0")
ANTERIOR_VOXELS = 4 * 6 * 3  # the anterior box below; 1 mm voxels: 1 uL each
MEASUREMENTS = [
    SegmentMeasurement("anterior", ANTERIOR_VOXELS / 1000.0, 0.8123456789),
    SegmentMeasurement("posterior", 0.0, None),  # empty segment, Dice not estimated
]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Path]]:
    """(SEG, SR, source files): a two-segment SEG of the real series and its report, written once."""
    sources = series_files(dicom_series(SERIES), None)
    first = pydicom.dcmread(sources[0], stop_before_pixels=True)
    labels = np.zeros((int(first.Columns), int(first.Rows), len(sources)), dtype=np.uint8)
    labels[10:14, 20:26, 5:8] = 1  # label 2 ("posterior") stays empty
    assert int((labels == 1).sum()) == ANTERIOR_VOXELS
    out = tmp_path_factory.mktemp("sr")
    seg = write_dicom_seg(labels, sources, {1: "anterior", 2: "posterior"}, ALGORITHM, out / "seg.dcm")
    sr = write_dicom_sr(seg, sources, MEASUREMENTS, ALGORITHM, out / "sr.dcm")
    return seg, sr, sources


def _secrets(path: Path) -> set[str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    values = {str(ds.get(k, "") or "") for k in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID")}
    return values - {""}


def test_reads_back_exactly_the_measurements_written(written: tuple[Path, Path, list[Path]]) -> None:
    _, sr, _ = written
    read = read_dicom_sr(sr)
    assert set(read) == {"anterior", "posterior"}
    assert set(read["anterior"]) == set(read["posterior"]) == {"volume_ml", "estimated_dice", "estimate_withheld"}
    assert read["anterior"]["estimate_withheld"] is read["posterior"]["estimate_withheld"] is None
    assert isinstance(read["anterior"]["volume_ml"], float) and isinstance(read["anterior"]["estimated_dice"], float)
    assert read["anterior"]["volume_ml"] == pytest.approx(0.072, abs=1e-6)
    assert read["anterior"]["estimated_dice"] == pytest.approx(0.8123456789, abs=1e-9)
    assert read["posterior"]["volume_ml"] == 0.0


def test_no_estimated_dice_writes_no_dice_measurement(written: tuple[Path, Path, list[Path]]) -> None:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    _, sr, _ = written
    assert read_dicom_sr(sr)["posterior"]["estimated_dice"] is None
    report = hd.sr.MeasurementReport.from_sequence(hd.sr.srread(sr).content)
    groups = {g.tracking_identifier: g for g in report.get_volumetric_roi_measurement_groups()}
    names = {k: [(m.name.value, m.name.scheme_designator) for m in g.get_measurements()] for k, g in groups.items()}
    assert names["posterior"] == [(codes.SCT.Volume.value, "SCT")]
    assert sorted(names["anterior"]) == sorted([(codes.SCT.Volume.value, "SCT"), ("EST-DICE", "99UNETPIPE")])
    units = {m.name.value: m.unit.value for m in groups["anterior"].get_measurements()}
    assert units == {codes.SCT.Volume.value: "ml", "EST-DICE": "1"}


def test_a_withheld_estimate_is_stated_with_why_instead_of_a_dice(written: tuple[Path, Path, list[Path]],
                                                                   tmp_path: Path) -> None:
    seg, _, sources = written
    withheld = [SegmentMeasurement("anterior", ANTERIOR_VOXELS / 1000.0, None, estimate_withheld=True),
                SegmentMeasurement("posterior", 0.0, None)]
    read = read_dicom_sr(write_dicom_sr(seg, sources, withheld, ALGORITHM, tmp_path / "sr.dcm"))
    assert read["anterior"]["estimated_dice"] is None
    assert read["anterior"]["estimate_withheld"] == "Withheld: input unlike the training data"
    assert read["posterior"] == {"volume_ml": 0.0, "estimated_dice": None, "estimate_withheld": None}


def test_references_the_seg_and_the_source_series_in_the_same_study(written: tuple[Path, Path, list[Path]]) -> None:
    import highdicom as hd

    seg_path, sr_path, sources = written
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    source = pydicom.dcmread(sources[0], stop_before_pixels=True)
    sr = hd.sr.srread(sr_path)
    assert sr.SOPClassUID == Comprehensive3DSRStorage
    assert sr.StudyInstanceUID == source.StudyInstanceUID == seg.StudyInstanceUID
    assert sr.PatientID == source.PatientID
    assert sr.SeriesInstanceUID not in {seg.SeriesInstanceUID, source.SeriesInstanceUID}
    assert int(sr.SeriesNumber) == int(seg.SeriesNumber) + 1
    assert sr.SeriesDescription != seg.SeriesDescription and sr.SeriesDescription.startswith(seg.SeriesDescription)

    # Evidence: the SEG and every source instance, all in the current study.
    evidence = {(series, sop) for _, series, sop, _ in sr.get_evidence(current_procedure_only=True)}
    source_sops = {(source.SeriesInstanceUID, pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                   for f in sources}
    assert evidence == source_sops | {(seg.SeriesInstanceUID, seg.SOPInstanceUID)}
    assert "PertinentOtherEvidenceSequence" not in sr

    # Each measurement group: the SEG instance, its segment by number, and the source series.
    numbers = {s.SegmentLabel: int(s.SegmentNumber) for s in seg.SegmentSequence}
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    groups = report.get_volumetric_roi_measurement_groups(referenced_sop_instance_uid=seg.SOPInstanceUID)
    assert sorted(g.tracking_identifier for g in groups) == ["anterior", "posterior"]
    for group in groups:
        ref = group.referenced_segment
        assert ref.referenced_sop_class_uid == seg.SOPClassUID
        assert ref.referenced_segment_numbers == [numbers[group.tracking_identifier]]
        assert ref.source_series_for_segmentation.value == source.SeriesInstanceUID
    observers = report.get_observer_contexts()
    assert [o.observer_identifying_attributes.name for o in observers] == [ALGORITHM.name]


def test_unknown_segment_is_an_input_error_and_writes_nothing(
    written: tuple[Path, Path, list[Path]], tmp_path: Path,
) -> None:
    seg, _, sources = written
    target = tmp_path / "sr.dcm"
    with pytest.raises(InputDataError, match="no segment named 'amygdala'") as raised:
        write_dicom_sr(seg, sources, [*MEASUREMENTS, SegmentMeasurement("amygdala", 1.0, 0.5)], ALGORITHM, target)
    assert raised.value.path == str(seg)
    assert os.listdir(tmp_path) == []


def test_sources_of_another_series_are_refused_without_patient_data(
    written: tuple[Path, Path, list[Path]], tmp_path: Path,
) -> None:
    seg, _, _ = written
    other = DICOM / "hippocrop_pgbm006"
    if not other.is_dir():
        pytest.skip(f"shared DICOM series not found at {other} (see ../shared/data/README.md)")
    sources = series_files(other, None)
    with pytest.raises(InputDataError, match="does not reference the given source series") as raised:
        write_dicom_sr(seg, sources, MEASUREMENTS, ALGORITHM, tmp_path / "sr.dcm")
    assert not any(secret in str(raised.value) for secret in _secrets(sources[0]) | _secrets(seg))
    assert os.listdir(tmp_path) == []


def test_written_atomically_alone_and_as_part_of_a_staged_set(
    written: tuple[Path, Path, list[Path]], tmp_path: Path,
) -> None:
    seg, sr, sources = written
    assert sorted(os.listdir(sr.parent)) == ["seg.dcm", "sr.dcm"]  # no temporary file left behind
    target = tmp_path / "report.dcm"
    with Staged() as staged:
        assert write_dicom_sr(seg, sources, MEASUREMENTS[:1], ALGORITHM, target, staged) == target
        assert not target.exists()  # not before the staged set is committed
    assert os.listdir(tmp_path) == ["report.dcm"]
    assert set(read_dicom_sr(target)) == {"anterior"}


def test_reading_a_file_that_is_no_measurement_report_is_an_input_error(
    written: tuple[Path, Path, list[Path]], tmp_path: Path,
) -> None:
    seg, _, _ = written
    with pytest.raises(InputDataError, match="is not a DICOM SR measurement report") as raised:
        read_dicom_sr(seg)
    assert raised.value.path == str(seg)
    with pytest.raises(InputDataError, match="does not exist"):
        read_dicom_sr(tmp_path / "missing.dcm")


def test_the_cases_review_flag_and_reasons_travel_in_the_report(written: tuple[Path, Path, list[Path]],
                                                                  tmp_path: Path) -> None:
    from pipeline.inference.dicom_sr import ReviewFlag, read_prediction_report, review_of
    from pipeline.pacs.worklist import _item

    seg, plain, sources = written
    record = {"flagged": True, "reasons": ["estimated Dice of anterior 0.41 (below 0.80)",
                                           "no posterior found, though every validation case had one"]}
    flag = review_of(record)
    assert flag == ReviewFlag(True, tuple(record["reasons"]))
    sr = write_dicom_sr(seg, sources, MEASUREMENTS, ALGORITHM, tmp_path / "sr.dcm", review=flag)
    report = read_prediction_report(sr)
    assert report is not None and report.review == flag
    assert read_dicom_sr(sr) == read_dicom_sr(plain)  # highdicom still reads the groups, measurements unchanged
    item = _item(report)  # what the worklist of a PACS lists for it
    assert item.flagged and item.reasons == flag.reasons
    calm = read_prediction_report(write_dicom_sr(seg, sources, MEASUREMENTS, ALGORITHM, tmp_path / "calm.dcm",
                                                 review=review_of({"flagged": False, "reasons": []})))
    assert calm.review == ReviewFlag(False, ()) and not _item(calm).flagged
    older = read_prediction_report(plain)  # a report that states no flag (written before reports did)
    assert older.review is None and not _item(older).flagged and _item(older).reasons == ()
