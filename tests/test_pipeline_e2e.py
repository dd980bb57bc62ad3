"""End to end: real runs, the registry's champion logic, predict/evaluate from the registry."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.cli import main

pytestmark = pytest.mark.slow


def _client(work_dir: Path):
    import mlflow

    uri = f"sqlite:///{(work_dir / 'mlflow.db').resolve()}"
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A real run on the tiny config (the gate's worse and better runs: tests/scheduling/test_nightly.py)."""
    import yaml

    from tests.conftest import TINY

    root = tmp_path_factory.mktemp("e2e")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    work = root / "work"
    assert main(["run", str(config), "--work-dir", str(work)]) == 0
    first = json.loads((work / "evaluation" / "fold_0" / "summary.json").read_text())
    first_predictions = {p.name: np.asarray(nib.load(p).dataobj)
                         for p in sorted((work / "evaluation" / "fold_0" / "predictions").glob("*.nii.gz"))}
    return {"config": config, "work": work, "first": first, "first_predictions": first_predictions}


def test_run_registers_a_champion_that_resolves(trained: dict) -> None:
    client = _client(trained["work"])
    champion = client.get_model_version_by_alias("tiny-unet", "champion")
    assert str(champion.version) == "1"
    run = client.get_run(champion.run_id)
    assert run.data.metrics["val_mean_dice"] == pytest.approx(trained["first"]["mean_dice"])
    assert trained["first"]["mean_dice"] > 0.5  # it learned something
    # The whole resolved config is logged as params, per-epoch curves as metrics.
    assert run.data.params["train.epochs"] == "12" and run.data.params["mlflow.model_name"] == "tiny-unet"
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(history) == 12 and history[-1].value < history[0].value
    assert len(client.get_metric_history(run.info.run_id, "val_dice")) >= 3
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/cases.csv", "evaluation/summary.json", "evaluation/postprocessing.json"} <= artifacts
    assert (trained["work"] / "checkpoints" / "fold_0" / "best.pt").is_file()


def test_predict_from_champion_keeps_input_geometry(trained: dict, tmp_path: Path, hippocampus: Path) -> None:
    work = trained["work"]
    synthetic = work / "demo_data" / "imagesTr" / "demo_000.nii.gz"
    real = sorted((hippocampus / "imagesTr").glob("*.nii.gz"))[0]
    out = tmp_path / "pred"
    code = main(["predict", "--model", "models:/tiny-unet@champion", str(synthetic), str(real),
                 "--out", str(out), "--work-dir", str(work)])
    assert code == 0
    for source in (synthetic, real):
        src, pred = nib.load(source), nib.load(out / source.name)
        assert pred.shape == src.shape
        np.testing.assert_allclose(pred.affine, src.affine, atol=1e-5)
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}
    # The synthetic case was seen in training or validation: the mask must overlap its label.
    label = np.asarray(nib.load(work / "demo_data" / "labelsTr" / "demo_000.nii.gz").dataobj)
    mask = np.asarray(nib.load(out / synthetic.name).dataobj)
    assert 2 * np.sum((mask > 0) & (label > 0)) / (np.sum(mask > 0) + np.sum(label > 0)) > 0.5
    # The masks, their records, the batch summary and report; nothing else (no temporary files).
    names = {p.name for p in out.iterdir()}
    cases = [p.name.removesuffix(".nii.gz") for p in (synthetic, real)]
    assert names == {f"{c}{s}" for c in cases for s in (".nii.gz", ".json")} | {".thumbnails", "report.html",
                                                                                 "summary.csv"}


def test_predict_from_the_champion_equals_its_validation_predictions(trained: dict, tmp_path: Path) -> None:
    """The champion carries the settings it was validated with (mirroring, postprocessing): same masks."""
    import torch

    from pipeline.inference.model import load_model
    from pipeline.registry.registration import resolve_model

    work = trained["work"]
    client = _client(work)
    champion = client.get_model_version_by_alias("tiny-unet", "champion")
    summary = json.loads(Path(client.download_artifacts(champion.run_id, "evaluation/summary.json", str(tmp_path))).read_text())
    model = load_model(resolve_model("models:/tiny-unet@champion", work, tmp_path / "dl").path, torch.device("cpu"))
    # What was validated is what the registered model carries.
    # TINY trains without augmentation, so without flips: validated, and stored, without mirroring.
    assert model.settings.mirror is False and model.checkpoint["inference"]["validated"] is True
    assert model.settings.postprocessing.to_dict() == summary["postprocessing"]
    predictions = trained["first_predictions"]
    assert predictions, "the first run kept no validation predictions"
    images = [work / "demo_data" / "imagesTr" / name for name in predictions]
    out = tmp_path / "pred"
    assert main(["predict", "--model", "models:/tiny-unet@champion", *map(str, images), "--out", str(out),
                 "--work-dir", str(work)]) == 0
    for name, expected in predictions.items():
        np.testing.assert_array_equal(np.asarray(nib.load(out / name).dataobj), expected, err_msg=name)


def test_predict_on_dicom_series_matches_simpleitk_geometry(trained: dict, tmp_path: Path) -> None:
    from tests.conftest import DICOM

    series = DICOM / "hippocrop_pgbm002"
    if not series.is_dir():
        pytest.skip(f"DICOM series not found at {series}")
    out = tmp_path / "pred"
    assert main(["predict", "--model", "models:/tiny-unet/1", str(series), "--out", str(out),
                 "--work-dir", str(trained["work"])]) == 0
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    ref = reader.Execute()
    pred = sitk.ReadImage(str(out / "hippocrop_pgbm002.nii.gz"))
    assert pred.GetSize() == ref.GetSize()
    np.testing.assert_allclose(pred.GetSpacing(), ref.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(pred.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(pred.GetDirection(), ref.GetDirection(), atol=1e-4)


def test_evaluate_writes_csv_and_summary(trained: dict, tmp_path: Path) -> None:
    work = trained["work"]
    out = tmp_path / "eval"
    code = main(["evaluate", "--model", str(work / "checkpoints" / "fold_0" / "best.pt"), "--data", str(work / "demo_data"),
                 "--out", str(out), "--work-dir", str(work)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    lines = (out / "cases.csv").read_text().splitlines()
    assert lines[0].startswith("case,dim sphere,bright sphere,hd95 dim sphere,hd95 bright sphere,surface_dice dim sphere")
    assert len(lines) == 1 + summary["num_cases"] == 9
    per_case = np.array([[float(v) for v in line.split(",")[1:3]] for line in lines[1:]])
    np.testing.assert_allclose(list(summary["dice_per_label"].values()), np.nanmean(per_case, 0), atol=1e-5)
    assert summary["mean_dice"] == pytest.approx(np.mean(list(summary["dice_per_label"].values())))

    # --cases (a held-out test split): only the listed cases are scored, with the same per-case Dice.
    rows = {line.split(",")[0]: line for line in lines[1:]}
    listed = tmp_path / "held.txt"
    listed.write_text("\n".join(sorted(rows)[:3]) + "\n")
    held = tmp_path / "held"
    assert main(["evaluate", "--model", str(work / "checkpoints" / "fold_0" / "best.pt"), "--data",
                 str(work / "demo_data"), "--cases", str(listed), "--out", str(held), "--work-dir", str(work)]) == 0
    held_lines = (held / "cases.csv").read_text().splitlines()[1:]
    assert json.loads((held / "summary.json").read_text())["num_cases"] == 3
    assert sorted(held_lines) == sorted(rows[c] for c in sorted(rows)[:3])


def test_run_ids_and_runs_uri(trained: dict, tmp_path: Path) -> None:
    client = _client(trained["work"])
    run_id = client.get_model_version("tiny-unet", "1").run_id
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", f"runs:/{run_id}/model", "--data", str(trained["work"] / "demo_data"),
                 "--out", str(out), "--work-dir", str(trained["work"])]) == 0
    assert json.loads((out / "summary.json").read_text())["mean_dice"] > 0.5


def test_two_dimensional_model_end_to_end(tmp_path: Path) -> None:
    import yaml

    from tests.conftest import TINY

    cfg = json.loads(json.dumps(TINY))
    cfg["model"]["spatial_dims"] = 2
    cfg["train"]["patch_size"] = [32, 32]
    cfg["train"]["epochs"] = 4
    cfg["mlflow"]["model_name"] = "tiny-2d"
    path = tmp_path / "tiny2d.yaml"
    path.write_text(yaml.safe_dump(cfg))
    work = tmp_path / "work"
    assert main(["run", str(path), "--work-dir", str(work)]) == 0
    image = work / "demo_data" / "imagesTr" / "demo_001.nii.gz"
    assert main(["predict", "--model", "models:/tiny-2d@champion", str(image), "--out", str(tmp_path / "p"),
                 "--work-dir", str(work)]) == 0
    assert nib.load(tmp_path / "p" / image.name).shape == nib.load(image).shape


def test_console_script_demo_help() -> None:
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("unet-pipeline")
    if not exe.exists():
        shutil.which("unet-pipeline") or pytest.skip("console script not installed")
    for cmd in ("run", "preprocess", "train", "evaluate", "predict"):
        res = subprocess.run([str(exe), cmd, "--help"], capture_output=True, text=True)
        assert res.returncode == 0 and f"usage: unet-pipeline {cmd}" in res.stdout


def test_each_work_dir_keeps_its_own_store(trained: dict, tmp_path: Path) -> None:
    """mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI; a later run in the same process must not follow it."""
    first, other = tmp_path / "first", tmp_path / "other"
    assert main(["run", str(trained["config"]), "--work-dir", str(first), "--set", "train.epochs=1"]) == 0
    # The premise: the first run left its own store in this process's environment.
    assert os.environ.get("MLFLOW_TRACKING_URI") == f"sqlite:///{(first / 'mlflow.db').resolve()}"
    assert main(["run", str(trained["config"]), "--work-dir", str(other), "--set", "train.epochs=1"]) == 0
    new_client = _client(other)
    version = new_client.get_model_version_by_alias("tiny-unet", "champion")
    assert str(version.version) == "1"
    assert new_client.get_run(version.run_id).info.run_id == version.run_id
    for work, count in ((first, 1), (trained["work"], 1)):
        client = _client(work)
        runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
        assert version.run_id not in {r.info.run_id for r in runs} and len(runs) == count, work.name


def test_registered_model_loads_as_mlflow_pyfunc(trained: dict, tmp_path: Path) -> None:
    """A colleague's path: mlflow.pyfunc.load_model on the champion, fed a raw scan, gives predict's mask."""
    import mlflow

    work = trained["work"]
    image = work / "demo_data" / "imagesTr" / "demo_005.nii.gz"
    out = tmp_path / "pred"
    assert main(["predict", "--model", "models:/tiny-unet@champion", str(image), "--out", str(out),
                 "--work-dir", str(work)]) == 0
    uri = f"sqlite:///{(work / 'mlflow.db').resolve()}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-unet@champion")
    scan = nib.load(image)
    labels = pyfunc.predict({"image": scan.get_fdata(dtype=np.float32), "affine": scan.affine})
    assert labels.shape == scan.shape and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.asarray(nib.load(out / image.name).dataobj))
