"""DICOM datasets: real hippocampus cases written as DICOM MR series with SEG and RTSTRUCT labels, read back.

The studies are made by ``scripts/make_dicom_dataset.py`` (highdicom SEGs, contourpy-traced RTSTRUCTs)
from the shared MSD cases, so the truth is the NIfTI label each was made from.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from pipeline.data.dicom_labels import place_on_grid
from tests.conftest import HIPPOCAMPUS, dicom_dataset_maker, run_main

CLASSES = ["Anterior", "Posterior"]


def _maker():
    return dicom_dataset_maker()


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict], object]:
    """Four real cases: SEG, RTSTRUCT, and both again on a series tilted by 25 degrees (oblique)."""
    data = HIPPOCAMPUS
    if not (data / "dataset.json").is_file():
        pytest.skip(f"real hippocampus data not found at {data} (see ../shared/data/README.md)")
    maker = _maker()
    entries = json.loads((data / "dataset.json").read_text())["training"][:4]
    out = tmp_path_factory.mktemp("dicom")
    made = [maker.make_study(data / e["image"], data / e["label"], out, CLASSES, n, kind, oblique)
            for n, (e, kind, oblique) in enumerate(zip(entries, ["SEG", "RTSTRUCT", "SEG", "RTSTRUCT"], [0, 0, 25, 25]))]
    return out, made, maker


def _config(tmp_path: Path, source: Path | str, extra: str = "") -> Path:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"data:\n  dataset: {source}\n  classes: [{', '.join(CLASSES)}]\n{extra}")
    return cfg


def _export(tmp_path: Path, source: Path, extra: str = "") -> tuple[dict, Path]:
    out = tmp_path / "export"
    result = run_main("dataset", "export", str(source), "--config", str(_config(tmp_path, source, extra)),
                      "--out", str(out), "--work-dir", str(tmp_path / "work"))
    assert result.returncode == 0, result.stderr
    return json.loads((out / "manifest.json").read_text()), out


def _in_world(original: Path, exported: Path, oblique_deg: float, maker) -> tuple[np.ndarray, np.ndarray]:
    """The original label placed on the exported label's grid by world coordinates, and the exported label."""
    o, e = nib.load(str(original)), nib.load(str(exported))
    moved = place_on_grid(np.asarray(o.dataobj).astype(np.uint8), maker.rotation(oblique_deg) @ o.affine, e.affine,
                          e.shape, "original")
    return moved, np.asarray(e.dataobj)


def test_export_gives_seg_labels_voxel_equal_and_rtstruct_dice_above_095(studies, tmp_path: Path) -> None:
    source, made, maker = studies
    manifest, out = _export(tmp_path, source)
    assert manifest["skipped"] == []
    by_series = {c["series_instance_uid"]: c for c in manifest["cases"]}
    assert set(by_series) == {m["series_uid"] for m in made}
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "Anterior": 1, "Posterior": 2} and meta["channel_names"] == {"0": "MRI"}
    for m, oblique in zip(made, [0, 0, 25, 25]):
        row = by_series[m["series_uid"]]
        assert (row["label_sop_instance_uid"], row["label_type"], row["algorithm_type"]) == \
            (m["label_sop_uid"], m["kind"], "MANUAL")
        truth, got = _in_world(Path(m["label"]), out / "labelsTr" / f"{row['case']}.nii.gz", oblique, maker)
        image = nib.load(str(out / "imagesTr" / f"{row['case']}_0000.nii.gz"))
        assert np.allclose(image.affine, nib.load(str(out / "labelsTr" / f"{row['case']}.nii.gz")).affine)
        if m["kind"] == "SEG":
            assert np.array_equal(truth, got), f"SEG of {m['series_uid']} differs from its NIfTI original"
        else:
            for value in (1, 2):
                dice = 2 * ((truth == value) & (got == value)).sum() / ((truth == value).sum() + (got == value).sum())
                assert dice >= 0.95, f"RTSTRUCT class {value} Dice {dice:.3f} (oblique {oblique})"


def test_a_second_export_converts_nothing_and_check_prints_the_same_cases(studies, tmp_path: Path) -> None:
    source, made, _ = studies
    first, _ = _export(tmp_path, source)
    result = run_main("dataset", "check", str(source), "--config", str(_config(tmp_path, source)),
                      "--work-dir", str(tmp_path / "work"))
    assert result.returncode == 0, result.stderr
    assert "4 case(s), 0 label(s) skipped, 0 not used; 0 instance(s) retrieved, 0 conversion(s)" in result.stdout
    as_json = run_main("dataset", "check", str(source), "--config", str(_config(tmp_path, source)),
                       "--work-dir", str(tmp_path / "work"), "--json")
    assert json.loads(as_json.stdout) == first


def _copy_study(source: Path, index: int, dest: Path) -> Path:
    target = dest / f"study_{index:04d}"
    shutil.copytree(source / f"study_{index:04d}", target)
    return target


def test_the_newest_human_label_is_used_and_automatic_ones_never(studies, tmp_path: Path) -> None:
    source, made, maker = studies
    dest = tmp_path / "src"
    study = _copy_study(source, 0, dest)
    slices = sorted((pydicom.dcmread(p) for p in (study / "mr").iterdir()), key=lambda d: int(d.InstanceNumber))
    label = np.asarray(nib.load(made[0]["label"]).dataobj).astype(np.uint8)
    (study / "label.dcm").unlink()
    older = maker.write_seg(label, slices, CLASSES, study / "a.dcm", datetime(2026, 2, 1, 9))
    automatic = maker.write_seg(label, slices, CLASSES, study / "b.dcm", datetime(2026, 2, 2, 9), automatic=True)
    corrected = label.copy()  # the reader moved the posterior's even slices into the anterior
    corrected[(label == 2) & (np.arange(label.shape[2]) % 2 == 0)[None, None, :]] = 1
    newest = maker.write_seg(corrected, slices, CLASSES, study / "c.dcm", datetime(2026, 2, 3, 9), fractional=True)
    manifest, out = _export(tmp_path, dest)
    assert [c["label_sop_instance_uid"] for c in manifest["cases"]] == [newest]
    assert manifest["cases"][0]["reader_correction"] is True
    assert older not in json.dumps(manifest) and automatic not in json.dumps(manifest)
    truth, got = _in_world(Path(made[0]["label"]), out / "labelsTr" / f"{manifest['cases'][0]['case']}.nii.gz", 0, maker)
    assert np.array_equal(got, place_on_grid(corrected, nib.load(made[0]["label"]).affine,
                                             nib.load(str(out / "labelsTr" / f"{manifest['cases'][0]['case']}.nii.gz")).affine,
                                             got.shape, "corrected"))
    # With only the automatic SEG left, there is no training label; allowed explicitly, it is one.
    for f in ("a.dcm", "c.dcm"):
        (study / f).unlink()
    result = run_main("dataset", "export", str(dest), "--config", str(_config(tmp_path, dest)), "--out",
                      str(tmp_path / "none"), "--work-dir", str(tmp_path / "work"))
    assert result.returncode != 0 and "no usable case" in result.stderr and not (tmp_path / "none").exists()
    allowed, _ = _export(tmp_path, dest, "  allow_automatic_labels: true\n")
    assert [c["label_sop_instance_uid"] for c in allowed["cases"]] == [automatic]


def _skip_reason(tmp_path: Path, dest: Path) -> str:
    manifest, _ = _export(tmp_path, dest)
    assert len(manifest["skipped"]) == 1, manifest
    return manifest["skipped"][0]["reason"]


def _bad(source: Path, tmp_path: Path, index: int = 0) -> tuple[Path, Path]:
    """A source of two good studies (so the export has a case) and a copy of ``index`` to spoil."""
    dest = tmp_path / "src"
    for good in (2, 3):
        _copy_study(source, good, dest)
    return dest, _copy_study(source, index, dest)


def test_a_label_whose_series_is_not_in_the_source_is_skipped(studies, tmp_path: Path) -> None:
    dest, study = _bad(studies[0], tmp_path)
    shutil.rmtree(study / "mr")
    assert "which is not in the source" in _skip_reason(tmp_path, dest)


def test_a_seg_in_another_frame_of_reference_or_of_other_instances_is_skipped(studies, tmp_path: Path) -> None:
    dest, study = _bad(studies[0], tmp_path)
    ds = pydicom.dcmread(study / "label.dcm")
    ds.FrameOfReferenceUID = pydicom.uid.generate_uid()
    ds.save_as(study / "label.dcm")
    assert "frame of reference" in _skip_reason(tmp_path, dest)
    ds.FrameOfReferenceUID = pydicom.dcmread(next((study / "mr").iterdir())).FrameOfReferenceUID
    for frame in ds.PerFrameFunctionalGroupsSequence[:1]:
        frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID = pydicom.uid.generate_uid()
    # An edited object is a new object: DICOM gives it a new UID (and the conversion cache relies on that).
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(study / "label.dcm")
    assert "source instances are not in image series" in _skip_reason(tmp_path, dest)


@pytest.mark.parametrize("spoil, reason", [
    ("no_contours", "has no contours"),
    ("open", "not CLOSED_PLANAR"),
    ("off_plane", "does not lie on a slice plane"),
    ("renamed", "no ROI matches a class"),
])
def test_a_bad_rtstruct_is_skipped_with_its_reason(studies, tmp_path: Path, spoil: str, reason: str) -> None:
    dest, study = _bad(studies[0], tmp_path, index=1)
    ds = pydicom.dcmread(study / "label.dcm")
    roi = ds.ROIContourSequence[1]
    if spoil == "no_contours":
        del roi.ContourSequence
    elif spoil == "open":
        roi.ContourSequence[0].ContourGeometricType = "OPEN_PLANAR"
    elif spoil == "off_plane":
        points = np.asarray(roi.ContourSequence[0].ContourData, float).reshape(-1, 3)
        normal = np.cross(*np.asarray(pydicom.dcmread(next((study / "mr").iterdir())).ImageOrientationPatient,
                                      float).reshape(2, 3))
        roi.ContourSequence[0].ContourData = [f"{x:.4f}" for x in (points + 0.5 * normal).ravel()]
    else:
        for item in ds.StructureSetROISequence:
            item.ROIName = f"structure {item.ROINumber}"
    ds.save_as(study / "label.dcm")
    said = _skip_reason(tmp_path, dest)
    assert reason in said
    if spoil in ("open", "off_plane"):  # the reason names the ROI and where its contour lies
        assert "ROI 'Posterior'" in said and "contour 1 " in said and "slice" in said, said


def _voxel_world(mr: Path, i: float, j: float, k: int) -> np.ndarray:
    """The LPS point of voxel (i, j) (column, row) on slice ``k`` of a series written by make_dicom_dataset."""
    first = sorted((pydicom.dcmread(p) for p in mr.iterdir()), key=lambda d: int(d.InstanceNumber))[k]
    u, v = np.asarray(first.ImageOrientationPatient[:3], float), np.asarray(first.ImageOrientationPatient[3:], float)
    sy, sx = (float(x) for x in first.PixelSpacing)
    return np.asarray(first.ImagePositionPatient, float) + i * sx * u + j * sy * v


def test_degenerate_and_slightly_off_plane_contours_are_read(studies, tmp_path: Path) -> None:
    """One- and two-point CLOSED_PLANAR contours (what rt-utils writes for specks and one-voxel lines) mark the voxel
    a point falls in and the voxels along the segment (a diagonal pair: just those two); contours a writer's
    rounding (0.04 slice) off their plane are placed on it. The rest of the label stays as the generator's contours
    give it: voxel for voxel."""
    source, made, maker = studies
    dest = tmp_path / "src"
    study = _copy_study(source, 1, dest)
    ds = pydicom.dcmread(study / "label.dcm")
    truth = np.asarray(nib.load(made[1]["label"]).dataobj).astype(np.uint8)
    k = int(np.argwhere(truth.any(axis=(0, 1)))[0, 0])  # the first slice holding a structure
    empty = np.argwhere(truth[:, :, k] == 0)
    (i1, j1) = empty[0]  # a background voxel: a one-point contour 0.3 voxel off its centre
    row = [(i, j) for i, j in empty if j == empty[-1][1]]  # three background voxels of one row: a two-point contour
    row = [(i, j) for (i, j) in row if all((i + d, j) in {tuple(e) for e in row} for d in (1, 2))][:1]
    assert row, "no three background voxels in a row"
    (i2, j2) = row[0]
    free = ~truth[:, :, k].astype(bool)  # a background 2 x 2 block the other two do not touch: a diagonal pair
    used = {(i1, j1)} | {(i2 + d, j2) for d in range(3)}
    blocks = [(i, j) for i, j in np.argwhere(free[:-1, :-1] & free[1:, :-1] & free[:-1, 1:] & free[1:, 1:])
              if not {(i, j), (i + 1, j), (i, j + 1), (i + 1, j + 1)} & used]
    (i3, j3) = blocks[-1]
    normal = np.cross(*np.asarray(pydicom.dcmread(next((study / "mr").iterdir())).ImageOrientationPatient,
                                  float).reshape(2, 3))
    for contours in ds.ROIContourSequence:
        for contour in contours.ContourSequence:
            points = np.asarray(contour.ContourData, float).reshape(-1, 3) + 0.04 * normal  # 1 mm slices
            contour.ContourData = [f"{x:.4f}" for x in points.ravel()]
    anterior = ds.ROIContourSequence[0].ContourSequence
    for points in ([_voxel_world(study / "mr", i1 + 0.3, j1 - 0.2, k)],
                   [_voxel_world(study / "mr", i2, j2, k), _voxel_world(study / "mr", i2 + 2, j2, k)],
                   [_voxel_world(study / "mr", i3 + 1, j3, k), _voxel_world(study / "mr", i3, j3 + 1, k)]):
        contour = pydicom.Dataset()
        contour.ContourGeometricType, contour.NumberOfContourPoints = "CLOSED_PLANAR", len(points)
        contour.ContourData = [f"{x:.4f}" for x in np.ravel(points)]
        anterior.append(contour)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(study / "label.dcm")
    manifest, out = _export(tmp_path, dest)
    assert manifest["skipped"] == [] and len(manifest["cases"]) == 1
    expected = truth.copy()
    expected[i1, j1, k] = 1
    expected[i2:i2 + 3, j2, k] = 1
    expected[i3 + 1, j3, k] = expected[i3, j3 + 1, k] = 1  # not the two voxels beside the diagonal
    exported = nib.load(str(out / "labelsTr" / f"{manifest['cases'][0]['case']}.nii.gz"))
    placed = place_on_grid(expected, nib.load(made[1]["label"]).affine, exported.affine, exported.shape, "expected")
    assert np.array_equal(np.asarray(exported.dataobj), placed)


def test_a_seg_without_a_matching_or_with_an_empty_segment_is_skipped(studies, tmp_path: Path) -> None:
    source, made, maker = studies
    dest, study = _bad(source, tmp_path)
    ds = pydicom.dcmread(study / "label.dcm")
    ds.SegmentSequence[1].SegmentLabel = "Tail"
    ds.save_as(study / "label.dcm")
    assert "no segment matches class 'Posterior'" in _skip_reason(tmp_path, dest)
    slices = sorted((pydicom.dcmread(p) for p in (study / "mr").iterdir()), key=lambda d: int(d.InstanceNumber))
    label = np.asarray(nib.load(made[0]["label"]).dataobj).astype(np.uint8)
    label[label == 2] = 0
    (study / "label.dcm").unlink()
    maker.write_seg(label, slices, CLASSES, study / "label.dcm", datetime(2026, 3, 1))
    assert "the segment of class 'Posterior' is empty" in _skip_reason(tmp_path, dest)


def test_a_label_of_an_image_series_that_cannot_be_read_is_skipped(studies, tmp_path: Path) -> None:
    dest, study = _bad(studies[0], tmp_path)
    victim = sorted((study / "mr").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:-500])
    assert "cannot be read" in _skip_reason(tmp_path, dest)


def test_a_dicom_source_needs_class_names(studies, tmp_path: Path) -> None:
    source = studies[0]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  dataset: {source}\n")
    result = run_main("dataset", "check", str(source), "--config", str(cfg), "--work-dir", str(tmp_path / "w"))
    assert result.returncode == 2 and "data.classes" in result.stderr and "Traceback" not in result.stderr


def test_an_rtstruct_written_by_another_tool_is_read_and_rasterised(tmp_path: Path) -> None:
    """pydicom's sample RTSTRUCT (no preamble or file meta; POINT ROIs beside a CLOSED_PLANAR body outline) on a
    series made for its frame of reference: the label is, voxel for voxel, the mask its contours describe (computed
    here by scikit-image: centres inside or on the outline, even-odd per slice); the points are ignored."""
    from pydicom.data import get_testdata_file
    from skimage.measure import points_in_poly

    rtstruct = Path(get_testdata_file("rtstruct.dcm"))
    ds = pydicom.dcmread(rtstruct, force=True)
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    series_uid = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].SeriesInstanceUID
    lps = np.array([[5.0, 0, 0, -250], [0, 5.0, 0, -200], [0, 0, 10.0, -200], [0, 0, 0, 1]])
    dest = tmp_path / "src"
    _maker().write_mr_series(np.zeros((100, 80, 3)), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, dest / "ct", "P9",
                             ds.StudyInstanceUID, datetime(2026, 1, 1), series_uid, frame.FrameOfReferenceUID)
    shutil.copy(rtstruct, dest / "structures")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"data:\n  dataset: {dest}\n  classes: [Patient]\n")
    result = run_main("dataset", "export", str(dest), "--config", str(cfg), "--out", str(tmp_path / "out"),
                      "--work-dir", str(tmp_path / "work"))
    assert result.returncode == 0, result.stderr
    case = json.loads((tmp_path / "out" / "manifest.json").read_text())["cases"][0]
    assert case["label_type"] == "RTSTRUCT" and case["label_sop_instance_uid"] == ds.SOPInstanceUID
    label = nib.load(str(tmp_path / "out" / "labelsTr" / f"{case['case']}.nii.gz"))
    truth = np.zeros((100, 80, 3), dtype=bool)  # the series' grid, axes i, j, k
    centres = np.stack(np.meshgrid(np.arange(100), np.arange(80), indexing="ij"), axis=-1).reshape(-1, 2)
    contours = [c for roi in ds.ROIContourSequence if int(roi.ReferencedROINumber) == 1 for c in roi.ContourSequence]
    for contour in contours:
        xyz = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        ij = (xyz[:, :2] - lps[:2, 3]) / 5.0
        k = int(round((xyz[0, 2] - lps[2, 3]) / 10.0))
        truth[:, :, k] ^= points_in_poly(centres, ij).reshape(100, 80)
    expected = place_on_grid(truth.astype(np.uint8), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, label.affine, label.shape,
                             "truth")
    assert len(contours) == 3 and expected.sum() > 3 * 60 * 30  # three slices of a 400 x 300 mm outline
    assert np.array_equal(np.asarray(label.dataobj), expected)


def test_a_multi_channel_task_finds_its_other_channels_in_the_study(studies, tmp_path: Path) -> None:
    source, made, maker = studies
    dest = tmp_path / "src"
    study = _copy_study(source, 0, dest)
    _copy_study(source, 2, dest)  # no second channel in this study: skipped
    first = pydicom.dcmread(next((study / "mr").iterdir()))
    image = nib.load(made[0]["image"])
    flair = np.asarray(image.dataobj, dtype=np.float64) * -1.0 + 7.0
    shifted = image.affine.copy()
    shifted[:3, 3] += 0.5 * shifted[:3, 0]  # half a voxel along i: another grid, resampled onto the T1's
    maker.write_mr_series(flair, shifted, study / "flair", "P0000", first.StudyInstanceUID, datetime(2026, 1, 1, 8),
                          frame_uid=first.FrameOfReferenceUID, description="FLAIR axial")
    manifest, out = _export(tmp_path, dest, "  channel_series: ['flair']\n")
    assert [c["series_instance_uid"] for c in manifest["cases"]] == [made[0]["series_uid"]]
    assert "channel 1 (data.channel_series 'flair'): no series of study" in manifest["skipped"][0]["reason"]
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "MRI", "1": "MRI"}
    case = manifest["cases"][0]["case"]
    t1 = nib.load(str(out / "imagesTr" / f"{case}_0000.nii.gz"))
    second = nib.load(str(out / "imagesTr" / f"{case}_0001.nii.gz"))
    assert np.allclose(t1.affine, second.affine) and t1.shape == second.shape
    a, b = np.asarray(t1.dataobj, dtype=np.float64).ravel(), np.asarray(second.dataobj, dtype=np.float64).ravel()
    inside = b != 0  # the resampled channel is 0 where it had no data
    assert np.corrcoef(a[inside], b[inside])[0, 1] < -0.9  # the FLAIR (the T1 negated) on the T1's grid
