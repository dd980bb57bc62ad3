"""RTSTRUCT out: a predicted label map written as an RTSTRUCT and read back by three readers at the Dice targets.

The "predicted" masks are real label maps (hippocampus MR, head-and-neck CT organs) on DICOM series made from
their images by ``scripts/make_dicom_dataset.py``. Each RTSTRUCT is read back by this project (``dataset
export``), by rt-utils (``RTStructBuilder.create_from(...).get_roi_mask_by_name``) and by plastimatch
(``plastimatch convert``), and compared with the mask it was written from, in world space.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from pipeline.data.dicom_labels import image_affine_lps, place_on_grid
from pipeline.inference import Algorithm, write_dicom_rtstruct
from tests.conftest import HIPPOCAMPUS, SHARED_DATA, dicom_dataset_maker, dicom_series, run_main, save_untrained_2mm_model

HN_CT = SHARED_DATA / "hn_ct"
HIPPO_CLASSES = ["Anterior", "Posterior"]
CT_CLASSES = ["Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Mandible"]
TARGET = {"hippocampus": 0.95, "ct": 0.98}
ALGORITHM = Algorithm("test-model", "3", "unet-pipeline test")


def _maker():
    return dicom_dataset_maker()


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def _plastimatch() -> str | None:
    return shutil.which("plastimatch") or next((str(p) for p in [Path(sys.executable).parent / "plastimatch"]
                                                if p.is_file()), None)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Two hippocampus cases (square slices: rt-utils' reader needs them) and one head-and-neck CT, each a DICOM
    series with the RTSTRUCT of its label map written by :func:`write_dicom_rtstruct`."""
    if not (HIPPOCAMPUS / "dataset.json").is_file() or not (HN_CT / "dataset.json").is_file():
        pytest.skip(f"real hippocampus/hn_ct data not found under {SHARED_DATA} (see ../shared/data/README.md)")
    maker = _maker()
    out = tmp_path_factory.mktemp("rtstruct")
    cases = []
    for n, entry in enumerate(json.loads((HIPPOCAMPUS / "dataset.json").read_text())["training"][:2]):
        img = nib.load(str(HIPPOCAMPUS / entry["image"]))
        volume = np.asarray(img.dataobj, dtype=np.float64)
        label = np.asarray(nib.load(str(HIPPOCAMPUS / entry["label"])).dataobj).astype(np.uint8)
        # rt-utils sizes its read mask (Columns, Rows) but fills it (row, column): pad the slices square.
        side = max(volume.shape[:2])
        pad = [(0, side - volume.shape[0]), (0, side - volume.shape[1]), (0, 0)]
        cases.append(("hippocampus", f"hippo{n}", np.pad(volume, pad), np.pad(label, pad), img.affine, HIPPO_CLASSES,
                      "MR"))
    entry = json.loads((HN_CT / "dataset.json").read_text())["training"][0]
    volume, label, affine = maker.hn_ct_case(HN_CT / entry["image"], HN_CT / entry["label"])
    cases.append(("ct", "ct0", volume, label, affine, CT_CLASSES, "CT"))
    made = []
    for task, name, volume, label, affine, classes, modality in cases:
        folder = out / task / name
        slices = maker.write_mr_series(volume, affine, folder / "image", name.upper(), pydicom.uid.generate_uid(),
                                       datetime(2026, 1, 1, 8), modality=modality)
        by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in (folder / "image").iterdir()}
        sources = [by_uid[s.SOPInstanceUID] for s in slices]
        path = write_dicom_rtstruct(label, sources, dict(enumerate(classes, start=1)), ALGORITHM,
                                    folder / "rtstruct.dcm")
        made.append({"task": task, "name": name, "folder": folder, "label": label, "affine": affine,
                     "classes": classes, "rtstruct": path, "slices": slices})
    return made


def test_the_rtstruct_is_automatic_names_the_model_and_references_every_slice(written) -> None:
    case = written[-1]
    ds = pydicom.dcmread(case["rtstruct"])
    first = case["slices"][0]
    assert ds.Modality == "RTSTRUCT" and ds.SeriesDescription == "unet-pipeline test-model v3"
    assert [r.ROIName for r in ds.StructureSetROISequence] == CT_CLASSES
    assert {r.ROIGenerationAlgorithm for r in ds.StructureSetROISequence} == {"AUTOMATIC"}
    assert (ds.StudyInstanceUID, ds.PatientID) == (first.StudyInstanceUID, first.PatientID)
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == first.FrameOfReferenceUID
    referenced = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == first.SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in referenced.ContourImageSequence] == \
        [s.SOPInstanceUID for s in case["slices"]]


def _truth_on(case: dict, affine_lps: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return place_on_grid(case["label"], np.diag([-1.0, -1.0, 1.0, 1.0]) @ case["affine"], affine_lps, shape, "truth")


def test_the_project_reads_it_back_through_dataset_export(written, tmp_path: Path) -> None:
    """Read by ``dataset export`` (the ROIs are AUTOMATIC: accepted knowingly with data.allow_automatic_labels)."""
    for task in ("hippocampus", "ct"):
        cases = [c for c in written if c["task"] == task]
        source = cases[0]["folder"].parent
        cfg = tmp_path / f"{task}.yaml"
        cfg.write_text(f"data:\n  dataset: {source}\n  classes: [{', '.join(cases[0]['classes'])}]\n")
        refused = run_main("dataset", "check", str(source), "--config", str(cfg), "--work-dir", str(tmp_path / "w"))
        assert refused.returncode == 2 and f"{len(cases)} label(s) set aside as AUTOMATIC" in refused.stdout
        out = tmp_path / f"out_{task}"
        result = run_main("dataset", "export", str(source), "--config", str(cfg), "--out", str(out),
                          "--work-dir", str(tmp_path / "w"), "--set", "data.allow_automatic_labels=true")
        assert result.returncode == 0, result.stderr
        rows = json.loads((out / "manifest.json").read_text())["cases"]
        assert len(rows) == len(cases) and {r["algorithm_type"] for r in rows} == {"AUTOMATIC"}
        for case, row in zip(sorted(cases, key=lambda c: c["slices"][0].SeriesInstanceUID),
                             sorted(rows, key=lambda r: r["series_instance_uid"])):
            exported = nib.load(str(out / "labelsTr" / f"{row['case']}.nii.gz"))
            got = np.asarray(exported.dataobj)
            truth = place_on_grid(case["label"], case["affine"], exported.affine, got.shape, "truth")
            for value, name in enumerate(case["classes"], start=1):
                dice = _dice(truth == value, got == value)
                assert dice >= TARGET[task], f"project reader: {case['name']} {name} Dice {dice:.4f}"


def test_rt_utils_reads_it_back(written) -> None:
    rt_utils = pytest.importorskip("rt_utils", reason="rt-utils is not installed (the test extra brings it)")
    for case in written:
        rt = rt_utils.RTStructBuilder.create_from(str(case["folder"] / "image"), str(case["rtstruct"]))
        assert rt.get_roi_names() == case["classes"]
        # rt-utils orders slices by position along the normal; its masks are (row, column, slice) in that order.
        k_of = {s.SOPInstanceUID: k for k, s in enumerate(case["slices"])}
        order = [k_of[s.SOPInstanceUID] for s in rt.series_data]
        for value, name in enumerate(case["classes"], start=1):
            truth = np.stack([case["label"][:, :, k].T == value for k in order], axis=-1)
            dice = _dice(truth, rt.get_roi_mask_by_name(name))
            assert dice >= TARGET[case["task"]], f"rt-utils: {case['name']} {name} Dice {dice:.4f}"


def test_plastimatch_reads_it_back(written, tmp_path: Path) -> None:
    import SimpleITK as sitk

    from transforms.dicom import read_dicom_series

    plastimatch = _plastimatch()
    if plastimatch is None:
        pytest.skip("plastimatch is not installed (the test extra brings it: pip install plastimatch)")
    for case in written:
        out = tmp_path / case["name"]
        result = subprocess.run([plastimatch, "convert", "--input", str(case["rtstruct"]), "--referenced-ct",
                                 str(case["folder"] / "image"), "--output-prefix", str(out), "--prefix-format", "nrrd"],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        image = read_dicom_series(case["folder"] / "image", case["slices"][0].SeriesInstanceUID)
        reference = image_affine_lps(image)
        truth = _truth_on(case, reference, image.GetSize())
        for value, name in enumerate(case["classes"], start=1):
            structure = sitk.ReadImage(str(out / f"{name}.nrrd"))
            mask = np.transpose(sitk.GetArrayFromImage(structure), (2, 1, 0)) > 0
            got = place_on_grid(mask.astype(np.uint8), image_affine_lps(structure), reference, image.GetSize(),
                                "plastimatch")
            dice = _dice(truth == value, got > 0)
            assert dice >= TARGET[case["task"]], f"plastimatch: {case['name']} {name} Dice {dice:.4f}"


def test_predict_writes_the_rtstruct_on_request_beside_the_seg(tmp_path: Path) -> None:
    """``predict --rtstruct`` on a real DICOM series: CASE.rtstruct.dcm, AUTOMATIC, read back as the NIfTI mask;
    no identifying value of the series reaches the console."""
    from pipeline.data.dicom_labels import ClassMatcher, read_label_header, rtstruct_label
    from transforms.dicom import read_dicom_series

    series = dicom_series("hippocrop_pgbm002")
    model = save_untrained_2mm_model(tmp_path / "model.pt")
    result = run_main("predict", "--model", str(model), str(series), "--out", str(tmp_path / "out"), "--rtstruct",
                      "--work-dir", str(tmp_path / "w"))
    assert result.returncode == 0, result.stderr[-3000:]
    path = tmp_path / "out" / "hippocrop_pgbm002.rtstruct.dcm"
    assert (tmp_path / "out" / "hippocrop_pgbm002.seg.dcm").is_file() and str(path) in result.stdout
    header = read_label_header(path)
    assert header.kind == "RTSTRUCT" and header.algorithm_type == "AUTOMATIC"
    first = pydicom.dcmread(next(series.glob("*.dcm")), stop_before_pixels=True)
    for value in (str(first.PatientName), str(first.PatientID)):
        assert value not in result.stdout + result.stderr
    image = read_dicom_series(series, first.SeriesInstanceUID)
    got = np.transpose(rtstruct_label(header, image, ClassMatcher(tuple(header.names)), first.FrameOfReferenceUID),
                       (2, 1, 0))
    mask = nib.load(str(tmp_path / "out" / "hippocrop_pgbm002.nii.gz"))
    truth = place_on_grid(np.asarray(mask.dataobj).astype(np.uint8), mask.affine,
                          np.diag([-1.0, -1.0, 1.0, 1.0]) @ image_affine_lps(image), image.GetSize(), "mask")
    assert truth.any()
    for value in range(1, len(header.names) + 1):
        if (truth == value).any():
            assert _dice(truth == value, got == value) >= 0.95
