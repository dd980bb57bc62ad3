"""Every prediction says how far to trust it, end to end on real data: a model trained on real
hippocampus MRI carries its calibration and training fingerprint; ``predict`` writes each case's
record, the SR, ``summary.csv`` and ``report.html``; out-of-domain inputs are flagged with reasons.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from pipeline.cli import main
from tests.conftest import HIPPOCAMPUS, TINY, copy_hippocampus_subset, dicom_series

pytestmark = pytest.mark.slow
MODEL = "quality-unet"


def _resample_slices(src: Path, dst: Path, slice_mm: float) -> Path:
    """A real scan resampled (linear) to ``slice_mm`` along its third axis, as a thick-slice acquisition would be."""
    image = sitk.ReadImage(str(src))
    spacing = list(image.GetSpacing())
    size = list(image.GetSize())
    new_size = [size[0], size[1], int(round(size[2] * spacing[2] / slice_mm))]
    out = sitk.Resample(image, new_size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                        [spacing[0], spacing[1], slice_mm], image.GetDirection(), 0.0, image.GetPixelID())
    sitk.WriteImage(out, str(dst))
    return dst


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A model trained and validated on 10 real hippocampus cases (5 validation cases: calibration fitted),
    registered, then ``predict`` on two unseen scans, a 3 mm thick-slice copy of one and a real DICOM crop."""
    if not (HIPPOCAMPUS / "dataset.json").is_file():
        pytest.skip(f"real hippocampus data not found at {HIPPOCAMPUS} (see ../shared/data/README.md)")
    series = dicom_series("hippocrop_pgbm002")
    root = tmp_path_factory.mktemp("quality")
    dataset = copy_hippocampus_subset(root / "ds", 10)
    cfg = json.loads(json.dumps(TINY))
    cfg["data"] = {"dataset": str(dataset), "num_folds": 2}
    cfg["train"].update({"epochs": 6, "patch_size": [32, 32, 32]})
    # One pass per window keeps the module fast; the mirrored spread is tested in test_estimate.py.
    cfg["evaluate"] = {**cfg["evaluate"], "mirror": False}
    cfg["mlflow"] = {"experiment": "quality", "model_name": MODEL}
    config = root / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    work = root / "work"
    assert main(["run", str(config), "--work-dir", str(work)]) == 0
    inputs = root / "in"
    inputs.mkdir()
    scans = sorted((HIPPOCAMPUS / "imagesTr").glob("*.nii.gz"))[-2:]  # not among the 10 training cases
    for scan in scans:
        shutil.copy(scan, inputs / scan.name)
    _resample_slices(scans[0], inputs / "thick_slices.nii.gz", 3.0)
    shutil.copytree(series, inputs / "dicom_crop")
    out = root / "pred"
    assert main(["predict", "--model", f"models:/{MODEL}@champion", str(inputs), "--out", str(out),
                 "--work-dir", str(work)]) == 0
    records = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    return {"work": work, "out": out, "records": records, "scans": scans, "root": root, "inputs": inputs}


def _model(calibrated: dict):
    from pipeline.inference import load_model

    return load_model(calibrated["work"] / "checkpoints" / "fold_0" / "model.pt", __import__("torch").device("cpu"))


def test_the_model_carries_its_calibration_and_training_fingerprint(calibrated: dict) -> None:
    import mlflow

    model = _model(calibrated)
    calibration = model.calibration
    # A label is fitted where at least 5 validation cases have it predicted (this short run may miss one).
    assert calibration is not None and calibration.labels and set(calibration.labels) <= {1, 2}
    assert calibration.validation["cases"] == 5
    assert 0.0 <= calibration.min_expected_dice <= 1.0
    fingerprint = model.plan["fingerprint"]
    assert fingerprint["cases"] == 10 and fingerprint["spacing_min"] == [1.0, 1.0, 1.0]
    uri = f"sqlite:///{calibrated['work'] / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("quality").experiment_id])[0]
    assert "quality_spearman_loo" in run.data.metrics and "quality_min_expected_dice" in run.data.metrics
    assert run.data.metrics["quality_min_expected_dice"] == pytest.approx(calibration.min_expected_dice)
    # The out-of-sample figures travel with the model and are logged beside the old ones.
    for key in ("spearman_oos", "worst5_caught", "flagged_share"):
        assert run.data.metrics[f"quality_{key}"] == pytest.approx(calibration.validation[key], nan_ok=True)
    assert calibration.reliable is not None
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/calibration.png", "evaluation/quality_calibration.json"} <= logged


def test_each_estimate_is_the_stored_calibration_applied_to_the_case_signals(calibrated: dict) -> None:
    calibration = _model(calibrated).calibration
    for name, record in calibrated["records"].items():
        signals = {e["value"]: e["signals"] for e in record["labels"].values()}
        expected = calibration.estimate(signals)
        conforms = record["conformity"]["conforms"]
        assert (record["estimate_withheld"] is None) == conforms, name
        for entry in record["labels"].values():
            # An input unlike the training data gets no estimate: it would be an extrapolation.
            assert entry["estimated_dice"] == (pytest.approx(expected[entry["value"]]) if conforms else None), name
        assert record["estimate_quality"]["cases"] == 5 and record["estimate_quality"]["reliable"] is calibration.reliable
        threshold = record["min_expected_dice"]
        assert threshold == pytest.approx(calibration.min_expected_dice)
        low = [n for n, e in record["labels"].items() if e["estimated_dice"] is not None and e["estimated_dice"] < threshold]
        assert record["flagged"] == bool(low or not record["conformity"]["conforms"]), name
        assert all(any(n in r for r in record["reasons"]) for n in low), name


def test_volumes_are_the_voxel_count_times_the_voxel_volume(calibrated: dict) -> None:
    import pydicom

    out = calibrated["out"]
    for name, record in calibrated["records"].items():
        mask = nib.load(out / record["files"]["mask"])
        data = np.asarray(mask.dataobj)
        voxel_ml = float(np.prod(mask.header.get_zooms()[:3])) / 1000
        for entry in record["labels"].values():
            count = int((data == entry["value"]).sum())
            assert entry["voxels"] == count
            assert entry["volume_ml"] == pytest.approx(count * voxel_ml, rel=1e-6), name
    # The thick-slice copy: 3 mm along its third axis, so each voxel is 3 uL.
    assert calibrated["records"]["thick_slices"]["voxel_volume_ml"] == pytest.approx(0.003)
    # The DICOM crop: the voxel volume from the headers (pixel spacing x slice distance), by hand.
    files = sorted(calibrated["inputs"].joinpath("dicom_crop").iterdir())
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    positions = sorted(float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files)
    by_hand = float(first.PixelSpacing[0]) * float(first.PixelSpacing[1]) * (positions[1] - positions[0]) / 1000
    assert calibrated["records"]["dicom_crop"]["voxel_volume_ml"] == pytest.approx(by_hand, rel=1e-4)


def test_the_sr_holds_the_volumes_and_estimates_of_the_case_record(calibrated: dict) -> None:
    from pipeline.inference import read_dicom_sr

    record = calibrated["records"]["dicom_crop"]
    assert record["files"]["sr"] == "dicom_crop.sr.dcm"
    read = read_dicom_sr(calibrated["out"] / record["files"]["sr"])
    assert set(read) == set(record["labels"])
    for name, entry in record["labels"].items():
        assert read[name]["volume_ml"] == pytest.approx(entry["volume_ml"], rel=1e-9)
        if entry["estimated_dice"] is None:  # no estimate (label not calibrated): no Dice in the SR either
            assert read[name]["estimated_dice"] is None
        else:
            assert read[name]["estimated_dice"] == pytest.approx(entry["estimated_dice"], rel=1e-9)
    assert any(e["estimated_dice"] is not None for e in record["labels"].values())
    from pipeline.inference import read_prediction_report

    review = read_prediction_report(calibrated["out"] / record["files"]["sr"]).review
    assert review is not None and (review.flagged, list(review.reasons)) == (record["flagged"], record["reasons"])


def test_a_thick_slice_scan_is_flagged_with_its_spacing_and_in_domain_scans_conform(calibrated: dict) -> None:
    records = calibrated["records"]
    thick = records["thick_slices"]
    assert thick["flagged"] and not thick["conformity"]["conforms"]
    assert any(r.startswith("spacing 1.00x1.00x3.00 mm, trained on 1.00x1.00x1.00 mm") for r in thick["reasons"])
    for scan in calibrated["scans"]:
        record = records[scan.name.replace(".nii.gz", "")]
        assert record["conformity"] == {"conforms": True, "reasons": [], "checked": True}


def test_summary_csv_and_report_list_every_case_flagged_first(calibrated: dict) -> None:
    from tests.quality.report_browser import check_report, skip_without_browser

    out, records = calibrated["out"], calibrated["records"]
    with open(out / "summary.csv", newline="") as fp:
        rows = list(csv.DictReader(fp))
    assert sorted(r["case"] for r in rows) == sorted(records)
    flags = [r["flagged"] == "yes" for r in rows]
    assert flags == sorted(flags, reverse=True) and any(flags)
    for row in rows:
        record = records[row["case"]]
        for name, entry in record["labels"].items():
            assert float(row[f"{name} volume_ml"]) == pytest.approx(entry["volume_ml"], rel=1e-5)
    skip_without_browser()
    shown = check_report(out / "report.html")
    assert sorted(shown["cases"]) == sorted(records)
    assert shown["flagged"] == sorted(shown["flagged"], reverse=True)
    assert shown["flagged"] == [records[c]["flagged"] for c in shown["cases"]]


def test_a_rerun_skips_done_cases_and_redoes_one_without_its_record(calibrated: dict) -> None:
    out = calibrated["out"]
    before = (out / "summary.csv").read_text()
    (out / "thick_slices.json").unlink()
    mask_time = (out / "dicom_crop.nii.gz").stat().st_mtime_ns
    assert main(["predict", "--model", f"models:/{MODEL}@champion", str(calibrated["inputs"]), "--out", str(out),
                 "--work-dir", str(calibrated["work"])]) == 0
    assert (out / "thick_slices.json").is_file()
    assert (out / "dicom_crop.nii.gz").stat().st_mtime_ns == mask_time
    assert (out / "summary.csv").read_text() == before


def test_the_validation_report_shows_true_beside_estimated_dice(calibrated: dict) -> None:
    from tests.quality.report_browser import check_report, skip_without_browser

    evaluation = calibrated["work"] / "evaluation" / "fold_0"
    assert (evaluation / "calibration.png").stat().st_size > 5000
    with open(evaluation / "quality.csv", newline="") as fp:
        rows = list(csv.DictReader(fp))
    assert len(rows) == 5
    cases = {r["case"]: r for r in rows}
    with open(evaluation / "cases.csv", newline="") as fp:
        for row in csv.DictReader(fp):
            for label in ("Anterior", "Posterior"):
                assert float(cases[row["case"]][f"{label} true_dice"]) == pytest.approx(float(row[label]), abs=1e-6)
    skip_without_browser()
    shown = check_report(evaluation / "report.html")
    assert sorted(shown["cases"]) == sorted(cases)


# ---------------------------------------------------------------- out-of-domain inputs through the real fingerprint


@pytest.mark.parametrize("series, expected", [
    ("chest_ct", ["modality CT, trained on MRI", "spacing 0.", "field of view", "intensity distribution unlike"]),
    ("pgbm003_t1post", ["spacing 0.43x0.43x6.50 mm", "field of view", "intensity distribution unlike"]),
])
def test_out_of_domain_series_are_flagged_with_every_reason(calibrated: dict, series: str, expected: list[str]) -> None:
    from pipeline.quality import check_conformity
    from transforms.preprocessing import preprocessing

    model = _model(calibrated)
    d = preprocessing(model.plan, with_label=False)({"image": [str(dicom_series(series))]})
    image = d["image"]
    result = check_conformity(model.plan["fingerprint"], np.asarray(image.meta["original_affine"]),
                              [int(s) for s in image.meta["spatial_shape"]], image.numpy(), image.meta.get("modality"))
    assert not result.conforms
    for start in expected:
        assert any(r.startswith(start) for r in result.reasons), (start, result.reasons)


def test_a_brain_series_through_the_hippocampus_model_gets_no_estimate_anywhere(calibrated: dict) -> None:
    """The real case behind the rule: a brain T1 post-contrast series was once estimated at Dice 1.0."""
    from pipeline.inference import read_dicom_sr
    from pipeline.quality.records import WITHHELD

    series = dicom_series("pgbm003_t1post")
    out = calibrated["root"] / "pred_brain"
    # No window overlap: the record is under test here, not the mask, and the series is large at 1 mm.
    assert main(["predict", "--model", f"models:/{MODEL}@champion", str(series), "--out", str(out), "--overlap", "0",
                 "--work-dir", str(calibrated["work"])]) == 0
    record = json.loads((out / "pgbm003_t1post.json").read_text())
    assert not record["conformity"]["conforms"] and record["flagged"]
    assert record["estimate_withheld"] == WITHHELD and record["estimated_mean_dice"] is None
    assert record["reasons"][0] == f"no estimated Dice: {WITHHELD}"
    assert any(r.startswith("spacing 0.43x0.43x6.50 mm") for r in record["reasons"])
    assert set(record["labels"]) == {"Anterior", "Posterior"}
    assert all(e["estimated_dice"] is None for e in record["labels"].values())
    with open(out / "summary.csv", newline="") as fp:
        (row,) = list(csv.DictReader(fp))
    assert row["estimate_withheld"] == WITHHELD and row["estimated_mean_dice"] == ""
    assert row["Anterior estimated_dice"] == row["Posterior estimated_dice"] == ""
    sr = read_dicom_sr(out / record["files"]["sr"])
    for name in record["labels"]:
        assert sr[name]["estimated_dice"] is None
        assert sr[name]["estimate_withheld"] == "Withheld: input unlike the training data"
    # The flag and every reason of the record travel in the SR, for a worklist read from the PACS.
    from pipeline.inference import read_prediction_report

    review = read_prediction_report(out / record["files"]["sr"]).review
    assert review is not None and review.flagged and list(review.reasons) == record["reasons"]
    page = (out / "report.html").read_text()
    assert page.count(">withheld</td>") == 3  # both labels and the mean
