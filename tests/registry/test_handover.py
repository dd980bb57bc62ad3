"""The registered model as a colleague uses it: loaded by MLflow alone, on a raw scan, the same as ``predict``.

The strongest test builds a fresh virtual environment from the model's own requirements (not this
project's), where ``import pipeline`` fails, and predicts there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import yaml

from pipeline.cli import main
from tests.conftest import HIPPOCAMPUS, TINY, copy_hippocampus_subset
from tests.mlflow_server import free_port

pytestmark = pytest.mark.slow
MODEL = "handover-unet"


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A model trained on real hippocampus cases and registered (SQLite store), plus ``predict``'s mask of a scan."""
    if not (HIPPOCAMPUS / "dataset.json").is_file():
        pytest.skip(f"real hippocampus data not found at {HIPPOCAMPUS} (see ../shared/data/README.md)")
    root = tmp_path_factory.mktemp("handover")
    dataset = copy_hippocampus_subset(root / "ds", 8)
    cfg = json.loads(json.dumps(TINY))
    cfg["data"] = {"dataset": str(dataset), "num_folds": 4}
    cfg["train"].update({"epochs": 4, "patch_size": [32, 32, 32]})
    cfg["mlflow"] = {"experiment": "handover", "model_name": MODEL}
    config = root / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    work = root / "work"
    assert main(["run", str(config), "--work-dir", str(work)]) == 0
    scan = sorted((HIPPOCAMPUS / "imagesTr").glob("*.nii.gz"))[-1]  # not among the 8 training cases
    out = root / "pred"
    assert main(["predict", "--model", f"models:/{MODEL}@champion", str(scan), "--out", str(out),
                 "--work-dir", str(work)]) == 0
    expected = np.asarray(nib.load(out / scan.name).dataobj)
    assert expected.any(), "the reference mask is empty: the comparison would prove little"
    return {"work": work, "uri": f"sqlite:///{work / 'mlflow.db'}", "scan": scan, "expected": expected, "root": root}


def _download(registered: dict, dst: Path) -> Path:
    import mlflow

    mlflow.set_tracking_uri(registered["uri"])
    mlflow.set_registry_uri(registered["uri"])
    return Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}@champion", dst_path=str(dst)))


def test_the_model_ships_its_code_and_pinned_requirements(registered: dict, tmp_path: Path) -> None:
    local = _download(registered, tmp_path / "model")
    assert {p.name for p in (local / "code").iterdir()} >= {"pipeline", "models", "transforms"}
    requirements = (local / "requirements.txt").read_text().split()
    names = {r.split("==")[0].lower() for r in requirements if "==" in r}
    assert {"torch", "monai", "nibabel", "pydicom", "simpleitk", "scipy", "numpy", "mlflow"} <= names
    assert all("+" not in r for r in requirements)  # public releases only, installable anywhere


def test_pyfunc_predicts_a_raw_scan_like_the_cli(registered: dict) -> None:
    import mlflow

    mlflow.set_tracking_uri(registered["uri"])
    mlflow.set_registry_uri(registered["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    scan = nib.load(registered["scan"])
    from_arrays = model.predict({"image": scan.get_fdata(dtype=np.float32), "affine": scan.affine})
    from_path = model.predict({"path": [str(registered["scan"])]})
    assert from_arrays.shape == scan.shape and from_arrays.dtype == np.uint8
    np.testing.assert_array_equal(from_arrays, registered["expected"])
    np.testing.assert_array_equal(from_path, registered["expected"])
    # The same measurements as the record ``predict`` wrote beside the mask.
    record = json.loads((registered["root"] / "pred" / registered["scan"].name.replace(".nii.gz", ".json")).read_text())
    measured = model.predict({"path": [str(registered["scan"])], "output": "measurements"})
    assert measured["labels"].keys() == record["labels"].keys()
    for name, entry in record["labels"].items():
        got = measured["labels"][name]
        assert (got["voxels"], got["volume_ml"]) == (entry["voxels"], entry["volume_ml"])
        assert (got["estimated_dice"] is None) == (entry["estimated_dice"] is None)
    assert {e["voxels"] for e in measured["labels"].values()} == {int((registered["expected"] == v).sum()) for v in (1, 2)}
    # The record names the model it came from, as predict's does: the version the alias pointed to.
    assert measured["model"] == record["model"] == {"name": MODEL, "version": "1"}


def test_a_run_s_model_names_its_run(registered: dict, tmp_path: Path) -> None:
    import mlflow
    import yaml

    from pipeline.registry.pyfunc import model_identity

    mlflow.set_tracking_uri(registered["uri"])
    mlflow.set_registry_uri(registered["uri"])
    run_id = mlflow.MlflowClient().get_model_version_by_alias(MODEL, "champion").run_id
    assert model_identity(_download(registered, tmp_path / "registered") / "artifacts" / "checkpoint.pt") == {
        "name": MODEL, "version": "1"}
    # Downloaded by its run, a registered model still names the one version that holds it (MLflow 3.18 marks
    # neither download), and a run's model the registry does not hold names its run.
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=str(tmp_path / "run")))
    assert model_identity(local / "artifacts" / "checkpoint.pt") == {"name": MODEL, "version": "1"}
    (local / "registered_model_meta").unlink(missing_ok=True)
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    mlmodel["run_id"], mlmodel["model_id"] = "0" * 32, "m-0"
    (local / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    assert model_identity(local / "artifacts" / "checkpoint.pt") == {"name": "run", "version": "0" * 32}


def test_mlflow_models_serve_answers_on_loopback(registered: dict) -> None:
    port = free_port()
    bin_dir = Path(sys.executable).parent  # an activated venv: mlflow serve starts uvicorn from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"], "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    mlflow_bin = str(bin_dir / "mlflow")
    server = subprocess.Popen([mlflow_bin, "models", "serve", "-m", f"models:/{MODEL}@champion", "--env-manager",
                               "local", "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stdout.read().decode()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        else:
            raise AssertionError("mlflow models serve did not answer /ping")
        scan = nib.load(registered["scan"])
        body = {"inputs": {"image": scan.get_fdata(dtype=np.float32).tolist(), "affine": scan.affine.tolist()}}
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=300)
        assert answer.status_code == 200, answer.text[:2000]
        labels = np.asarray(answer.json()["predictions"], dtype=np.uint8)
        np.testing.assert_array_equal(labels, registered["expected"])
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_fresh_environment_from_the_models_requirements_predicts_the_same(registered: dict, tmp_path: Path) -> None:
    """A colleague's machine: a new venv with only the model's requirements; this project is not installed."""
    local = _download(registered, tmp_path / "model")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # No byte-compiling of every installed module (torch's thousands): what installs is the same, only faster.
    res = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-compile", "-r", str(local / "requirements.txt")],
                         capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    scan = nib.load(registered["scan"])
    np.save(tmp_path / "image.npy", scan.get_fdata(dtype=np.float32))
    np.save(tmp_path / "affine.npy", scan.affine)
    script = tmp_path / "use_it.py"
    script.write_text(
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('pipeline') is None, 'the project is installed here'\n"
        "import numpy as np, mlflow\n"
        f"mlflow.set_tracking_uri({registered['uri']!r}); mlflow.set_registry_uri({registered['uri']!r})\n"
        f"model = mlflow.pyfunc.load_model('models:/{MODEL}@champion')\n"
        "labels = model.predict({'image': np.load('image.npy'), 'affine': np.load('affine.npy')})\n"
        "np.save('labels.npy', labels)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    res = subprocess.run([str(python), str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**env, "UNET_DEVICE": "cpu"})
    assert res.returncode == 0, res.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), registered["expected"])
    shutil.rmtree(venv, ignore_errors=True)
