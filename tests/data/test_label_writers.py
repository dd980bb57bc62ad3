"""The writer matrix: labels written from known masks by the tools labs use, read back through ``dataset export``.

Each writer gets real images of ``../shared/data`` as DICOM series (``scripts/make_dicom_dataset.py``) and the
masks they were labelled with: hippocampus MRI (two small structures; 10 cases, the first again on a series tilted
by 25 degrees) and the five head-and-neck organs on CT,
cropped so that the mandible touches the volume's in-plane edge and the spinal cord its last slice, with a hole
punched through the brainstem. RTSTRUCT by rt-utils (OpenCV contours through boundary voxels' centres,
one- and two-point contours for specks) and by plastimatch (``plastimatch convert``, contours around voxel
edges, holes keyholed); SEG by highdicom (BINARY and FRACTIONAL) and by dcmqi (``itkimage2segimage``). What
``dataset export`` gives back is compared with the masks in world space: SEG voxel for voxel, RTSTRUCT by Dice
per structure and case (>= 0.95 on the hippocampus, >= 0.98 on the CT organs). Beside them, two real SEGs from
dcmqi's own test data (tests/fixtures/dcmqi_segmentations) with the label maps they were made from.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from pipeline.data.dicom_labels import place_on_grid
from tests.conftest import HIPPOCAMPUS, REPO, SHARED_DATA, dicom_dataset_maker, run_main

HN_CT = SHARED_DATA / "hn_ct"
HIPPO_CLASSES = ["Anterior", "Posterior"]
CT_CLASSES = ["Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Mandible"]
RTSTRUCT_WRITERS = ["rt-utils", "plastimatch"]
SEG_WRITERS = ["highdicom-binary", "highdicom-fractional", "dcmqi"]
DICE_TARGET = {"hippocampus": 0.95, "hn_ct": 0.98}
HIPPO_CASES = 10  # the acceptance folder: every rt-utils object of 10 real cases used
BIN = Path(sys.executable).parent  # plastimatch and dcmqi install their executables beside the interpreter


def _maker():
    return dicom_dataset_maker()


@dataclass
class Case:
    """One real case as the writers get it.

    Args:
        name: its MSD name.
        image: the image (axes i, j, k).
        label: the label map on the image's grid (what every writer is given, and the truth).
        affine: its voxel -> RAS map.
    """

    name: str
    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray


def _hippocampus_cases() -> list[Case]:
    if not (HIPPOCAMPUS / "dataset.json").is_file():
        pytest.skip(f"real hippocampus data not found at {HIPPOCAMPUS} (see ../shared/data/README.md)")
    cases = []
    for entry in json.loads((HIPPOCAMPUS / "dataset.json").read_text())["training"][:HIPPO_CASES]:
        img, lab = nib.load(str(HIPPOCAMPUS / entry["image"])), nib.load(str(HIPPOCAMPUS / entry["label"]))
        cases.append(Case(Path(entry["image"]).name.split(".")[0], np.asarray(img.dataobj, dtype=np.float64),
                          np.asarray(lab.dataobj).astype(np.uint8), img.affine))
    # The first case again on a series tilted by 25 degrees: off-axis contours, rounded by each writer.
    first = cases[0]
    cases.append(Case(f"{first.name}_oblique", first.image, first.label, _maker().rotation(25.0) @ first.affine))
    return cases


def _ct_case(entry: dict) -> Case:
    """A head-and-neck CT cropped around its organs; the brainstem gets a hole on the slices wide enough for one.

    The crop starts at the mandible's first voxel along axis 0 (it touches that face of the volume) and ends at the
    spinal cord's last slice (it touches the last slice), so writers meet structures on the volume's edge.
    """
    from scipy.ndimage import binary_erosion

    img, lab = nib.load(str(HN_CT / entry["image"])), nib.load(str(HN_CT / entry["label"]))
    label = np.asarray(lab.dataobj).astype(np.uint8)
    where = np.argwhere(label > 0)
    lo, hi = np.maximum(where.min(0) - 3, 0), np.minimum(where.max(0) + 4, label.shape)
    lo[0] = np.argwhere(label == 5)[:, 0].min()
    hi[2] = np.argwhere(label == 2)[:, 2].max() + 1
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    label = label[crop].copy()
    for k in range(label.shape[2]):
        core = binary_erosion(label[:, :, k] == 1, iterations=2)
        if core.sum() >= 4:
            label[:, :, k][core] = 0
    affine = img.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ lo
    return Case(Path(entry["image"]).name.split(".")[0], np.asarray(img.dataobj, dtype=np.float64)[crop], label,
                affine)


def _ct_cases() -> list[Case]:
    if not (HN_CT / "dataset.json").is_file():
        pytest.skip(f"real head-and-neck CT data not found at {HN_CT} (see ../shared/data/README.md)")
    entries = json.loads((HN_CT / "dataset.json").read_text())["training"]
    return [_ct_case(e) for e in entries[:2]]  # 3.9 x 3.9 x 2.5 mm and 4.6 x 4.6 x 3.0 mm


def _sitk_mask(values: np.ndarray, affine_ras: np.ndarray):
    """A SimpleITK image of ``values`` (axes i, j, k) with the series' geometry, for the file-based writers."""
    import SimpleITK as sitk

    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(values, (2, 1, 0))))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(x) for x in lps[:3, 3]])
    image.SetDirection([float(x) for x in (lps[:3, :3] / spacing).ravel()])
    return image


def _write_rt_utils(case: Case, mr: Path, classes: list[str], path: Path, slices: list[pydicom.Dataset]) -> None:
    try:
        from rt_utils import RTStructBuilder
    except ImportError as exc:  # OpenCV's wheel links libGL and GLib; `make test` installs them as root
        pytest.skip(f"rt-utils cannot be imported ({exc}): install Debian's libgl1 and libglib2.0-0t64")
    builder = RTStructBuilder.create_new(dicom_series_path=str(mr))
    # rt-utils' masks are [rows, columns, slices] in its own slice order: map its slices to ours by SOP UID.
    k_of = {str(s.SOPInstanceUID): k for k, s in enumerate(slices)}
    order = [k_of[str(s.SOPInstanceUID)] for s in builder.series_data]
    for value, name in enumerate(classes, start=1):
        mask = np.transpose(case.label == value, (1, 0, 2))[:, :, order]  # (i, j) -> (row j, column i)
        builder.add_roi(mask=mask, name=name)  # rt-utils' defaults, as a lab converting its masks would call it
    builder.save(str(path))


def _write_plastimatch(case: Case, mr: Path, classes: list[str], path: Path, work: Path) -> None:
    import SimpleITK as sitk

    masks = work / "masks"
    masks.mkdir(parents=True)
    for value, name in enumerate(classes, start=1):
        sitk.WriteImage(_sitk_mask((case.label == value).astype(np.uint8), case.affine), str(masks / f"{name}.nrrd"))
    subprocess.run([str(BIN / "plastimatch"), "convert", "--input-prefix", str(masks), "--referenced-ct", str(mr),
                    "--output-dicom", str(work / "out")], check=True, capture_output=True)
    (rtss,) = (work / "out").glob("rtss*.dcm")
    shutil.move(rtss, path)


def _write_dcmqi(case: Case, mr: Path, classes: list[str], path: Path, work: Path) -> None:
    import SimpleITK as sitk

    work.mkdir(parents=True)
    sitk.WriteImage(_sitk_mask(case.label, case.affine), str(work / "label.nrrd"))
    code = {"CodeValue": "85756007", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Tissue"}
    meta = {"ContentCreatorName": "Reader^One", "ClinicalTrialSeriesID": "1", "ClinicalTrialTimePointID": "1",
            "SeriesDescription": "reader", "SeriesNumber": "300", "InstanceNumber": "1", "BodyPartExamined": "",
            "segmentAttributes": [[{"labelID": v, "SegmentLabel": n, "SegmentDescription": n,
                                    "SegmentAlgorithmType": "MANUAL", "SegmentedPropertyCategoryCodeSequence": code,
                                    "SegmentedPropertyTypeCodeSequence": code}
                                   for v, n in enumerate(classes, start=1)]]}
    (work / "meta.json").write_text(json.dumps(meta))
    subprocess.run([str(BIN / "itkimage2segimage"), "--inputImageList", str(work / "label.nrrd"),
                    "--inputDICOMDirectory", str(mr), "--outputDICOM", str(path), "--inputMetadata",
                    str(work / "meta.json")], check=True, capture_output=True)


def _write(writer: str, case: Case, study: Path, classes: list[str], slices: list[pydicom.Dataset],
           maker) -> str:
    """Write ``case``'s label with ``writer`` into ``study/label.dcm``; its SOPInstanceUID."""
    path, mr, work = study / "label.dcm", study / "mr", study.parent.parent / "work" / writer / study.name
    if writer == "rt-utils":
        _write_rt_utils(case, mr, classes, path, slices)
    elif writer == "plastimatch":
        _write_plastimatch(case, mr, classes, path, work)
    elif writer == "dcmqi":
        _write_dcmqi(case, mr, classes, path, work)
    else:
        maker.write_seg(case.label, slices, classes, path, datetime(2026, 4, 1, 9),
                        fractional=writer == "highdicom-fractional")
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[Case], Path, list[list]]]:
    """Each data set's cases as DICOM series (written once; each writer's source gets a copy)."""
    maker = _maker()
    made = {}
    for dataset, cases in (("hippocampus", _hippocampus_cases()), ("hn_ct", _ct_cases())):
        root = tmp_path_factory.mktemp(f"series_{dataset}")
        all_slices = [maker.write_mr_series(c.image, c.affine, root / c.name, f"P{n:04d}", pydicom.uid.generate_uid(),
                                            datetime(2026, 1, 1, 8, n)) for n, c in enumerate(cases)]
        made[dataset] = (cases, root, all_slices)
    return made


def _dice(truth: np.ndarray, got: np.ndarray) -> float:
    total = truth.sum() + got.sum()
    return float(2 * (truth & got).sum() / total) if total else 1.0


def _written_and_exported(dataset: str, writer: str, series: dict, tmp_path: Path) -> tuple[dict, dict]:
    """Every case of ``dataset`` labelled by ``writer`` in one source folder, exported; per case and class: (Dice,
    voxel-equal), and the manifest."""
    cases, root, all_slices = series[dataset]
    classes = HIPPO_CLASSES if dataset == "hippocampus" else CT_CLASSES
    maker, source = _maker(), tmp_path / "source"
    label_uids = {}
    for case, slices in zip(cases, all_slices):
        study = source / case.name
        shutil.copytree(root / case.name, study / "mr")
        label_uids[str(slices[0].SeriesInstanceUID)] = (_write(writer, case, study, classes, slices, maker), case)
    cfg = tmp_path / "config.yaml"
    # rt-utils marks its ROIs AUTOMATIC unless told otherwise: a lab converting its readers' masks accepts them.
    cfg.write_text(f"data:\n  dataset: {source}\n  classes: [{', '.join(classes)}]\n  allow_automatic_labels: true\n")
    out = tmp_path / "export"
    result = run_main("dataset", "export", str(source), "--config", str(cfg), "--out", str(out),
                      "--work-dir", str(tmp_path / "work"))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    scores = {}
    for row in manifest["cases"]:
        sop, case = label_uids[row["series_instance_uid"]]
        assert row["label_sop_instance_uid"] == sop
        exported = nib.load(str(out / "labelsTr" / f"{row['case']}.nii.gz"))
        got = np.asarray(exported.dataobj)
        truth = place_on_grid(case.label, case.affine, exported.affine, got.shape, f"the {case.name} masks")
        scores[case.name] = {name: (_dice(truth == v, got == v), bool(np.array_equal(truth == v, got == v)))
                             for v, name in enumerate(classes, start=1)}
    return scores, manifest


def _table(dataset: str, writer: str, scores: dict) -> str:
    lines = [f"{dataset} / {writer}:"]
    for name in next(iter(scores.values())):
        dice = [s[name][0] for s in scores.values()]
        equal = sum(s[name][1] for s in scores.values())
        lines.append(f"  {name:<13} Dice min {min(dice):.4f} mean {np.mean(dice):.4f}; voxel-equal {equal}/{len(dice)}")
    return "\n".join(lines)


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["hippocampus", "hn_ct"])
@pytest.mark.parametrize("writer", SEG_WRITERS)
def test_seg_from_every_writer_comes_back_voxel_equal(series, tmp_path: Path, dataset: str, writer: str) -> None:
    scores, manifest = _written_and_exported(dataset, writer, series, tmp_path)
    print(_table(dataset, writer, scores))
    assert manifest["skipped"] == [] and len(scores) == len(series[dataset][0])
    unequal = [(case, name) for case, s in scores.items() for name, (_, equal) in s.items() if not equal]
    assert unequal == [], f"{writer} SEG not voxel-equal: {unequal}"


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["hippocampus", "hn_ct"])
@pytest.mark.parametrize("writer", RTSTRUCT_WRITERS)
def test_rtstruct_from_every_writer_meets_the_dice_target(series, tmp_path: Path, dataset: str, writer: str) -> None:
    """Per structure and per case; on the hippocampus with rt-utils this is the acceptance folder: the RTSTRUCTs of
    10 real cases (and of the first again, oblique), every object used, none skipped."""
    scores, manifest = _written_and_exported(dataset, writer, series, tmp_path)
    print(_table(dataset, writer, scores))
    assert manifest["skipped"] == [] and len(scores) == len(series[dataset][0])
    low = [(case, name, round(d, 4)) for case, s in scores.items() for name, (d, _) in s.items()
           if d < DICE_TARGET[dataset]]
    assert low == [], f"{writer} RTSTRUCT below Dice {DICE_TARGET[dataset]}: {low}"


@pytest.mark.slow
def test_the_ct_cases_hold_what_the_matrix_claims(series) -> None:
    """The cropped CT cases really have a structure with a hole and structures on the volume's edge."""
    from scipy.ndimage import binary_fill_holes

    for case in series["hn_ct"][0]:
        brainstem = case.label == 1
        holes = sum(int((binary_fill_holes(brainstem[:, :, k]) & ~brainstem[:, :, k]).sum())
                    for k in range(brainstem.shape[2]))
        assert holes > 0, case.name
        assert (case.label[0] == 5).any() and (case.label[:, :, -1] == 2).any(), case.name


@pytest.mark.parametrize("name", ["23x38x3", "24x38x3"])
def test_dcmqis_own_test_segs_come_back_voxel_equal(tmp_path: Path, name: str) -> None:
    """Real SEGs from dcmqi's test data (tests/fixtures/README.md), with the NRRD label each was made from."""
    import SimpleITK as sitk

    fixture = REPO / "tests" / "fixtures" / "dcmqi_segmentations" / name
    source = tmp_path / "source"
    for part in ("image", "seg"):
        shutil.copytree(fixture / part, source / part)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"data:\n  dataset: {source}\n  classes: [Liver]\n")
    out = tmp_path / "export"
    result = run_main("dataset", "export", str(source), "--config", str(cfg), "--out", str(out),
                      "--work-dir", str(tmp_path / "work"))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    seg = pydicom.dcmread(fixture / "seg" / "label.seg", stop_before_pixels=True)
    assert manifest["skipped"] == [] and [c["label_sop_instance_uid"] for c in manifest["cases"]] == [seg.SOPInstanceUID]
    nrrd = sitk.ReadImage(str(fixture / "nrrd" / "label.nrrd"))
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(nrrd.GetDirection()).reshape(3, 3) * np.asarray(nrrd.GetSpacing())
    lps[:3, 3] = nrrd.GetOrigin()
    truth = np.transpose(sitk.GetArrayFromImage(nrrd), (2, 1, 0)).astype(np.uint8)
    exported = nib.load(str(out / "labelsTr" / f"{manifest['cases'][0]['case']}.nii.gz"))
    placed = place_on_grid(truth, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, exported.affine, exported.shape, "nrrd")
    assert placed.sum() > 300 and np.array_equal(np.asarray(exported.dataobj), placed)
