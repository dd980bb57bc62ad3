"""Models handed over before the layout change still load and predict the same with the moved code.

``pipeline/`` was regrouped into subpackages after commit :data:`PRE_LAYOUT_COMMIT`. A
checkpoint that commit wrote (``tests/fixtures/pre_layout_model.pt``) and a model it
registers in MLflow (done here, with that commit's own code taken from git) must give,
through today's ``predict``, the masks that commit's ``predict`` gives: voxel for voxel,
on real MRI as NIfTI and as a DICOM series. The registered model's pyfunc, which ships
the old code, must still load and predict beside the moved package.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import DICOM, HIPPOCAMPUS, REPO, run_main

pytestmark = pytest.mark.slow

PRE_LAYOUT_COMMIT = "7f4d4e5193dcd2f225cfcdb5ca559043e38160b5"
FIXTURE = REPO / "tests" / "fixtures" / "pre_layout_model.pt"
MODEL_NAME = "pre-layout"


def _old_code(dst: Path) -> Path:
    """The pre-layout commit's packages, from git; skips when the history is not there."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("git or the repository's history is not available")
    found = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{PRE_LAYOUT_COMMIT}^{{commit}}"],
                           capture_output=True)
    if found.returncode != 0:
        pytest.skip(f"commit {PRE_LAYOUT_COMMIT[:7]} is not in this clone (shallow?)")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", PRE_LAYOUT_COMMIT,
                              "pipeline", "models", "transforms", "configs"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dst, filter="data")
    return dst


def _run_old(code: Path, script: str, env: dict[str, str]) -> None:
    """Run ``script`` with the old packages first on the path (a fresh interpreter: nothing of today's imported)."""
    done = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(code)!r})\n{script}"],
                          capture_output=True, text=True, env={**os.environ, **env, "PYTHONPATH": str(code)},
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _inputs(tmp: Path) -> list[Path]:
    if not (HIPPOCAMPUS / "dataset.json").is_file() or not (DICOM / "hippocrop_pgbm002").is_dir():
        pytest.skip(f"shared data not found under {HIPPOCAMPUS.parent} (see ../shared/data/README.md)")
    entries = json.loads((HIPPOCAMPUS / "dataset.json").read_text())["training"]
    # Cases the fixture was not trained on (it saw the first 12), and a real DICOM series.
    cases = [HIPPOCAMPUS / e["image"] for e in entries[40:42]]
    series = tmp / "hippocrop_pgbm002"
    shutil.copytree(DICOM / "hippocrop_pgbm002", series)
    return [*cases, series]


@pytest.fixture(scope="module")
def old(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """What the pre-layout commit predicts with the fixture, and the model it registers."""
    tmp = tmp_path_factory.mktemp("pre_layout")
    code = _old_code(tmp / "code")
    inputs = _inputs(tmp)
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": store}
    _run_old(code, f"""
from pathlib import Path
import mlflow
from pipeline import registry
from pipeline.cli import main
registry.setup({store!r}, Path({str(tmp)!r}), "pre-layout")
with mlflow.start_run():
    assert registry.log_model(Path({str(FIXTURE)!r}), {MODEL_NAME!r}) == "1"
code = main(["predict", "--model", {str(FIXTURE)!r}, *{[str(p) for p in inputs]!r}, "--out", {str(tmp / 'old')!r},
             "--no-seg", "--compile", "off"])
sys.exit(code)
""", env)
    return {"tmp": tmp, "inputs": inputs, "store": store, "masks": tmp / "old"}


def _masks(folder: Path) -> dict[str, nib.Nifti1Image]:
    return {p.name: nib.load(p) for p in sorted(folder.glob("*.nii.gz"))}


def _assert_same_masks(old: Path, new: Path) -> None:
    before, after = _masks(old), _masks(new)
    assert sorted(before) == sorted(after) and len(before) == 3
    for name, image in before.items():
        expected = np.asarray(image.dataobj)
        got = np.asarray(after[name].dataobj)
        assert set(np.unique(expected)) >= {0, 1, 2}, f"{name}: the old mask is too trivial to compare"
        assert got.dtype == expected.dtype and np.array_equal(got, expected), name
        assert np.array_equal(after[name].affine, image.affine), name


def test_a_pre_layout_checkpoint_predicts_the_same(old: dict, tmp_path: Path) -> None:
    done = run_main("predict", "--model", str(FIXTURE), *map(str, old["inputs"]), "--out", str(tmp_path / "new"),
                    "--no-seg", "--compile", "off")
    assert done.returncode == 0, done.stderr
    _assert_same_masks(old["masks"], tmp_path / "new")


def test_a_model_registered_before_the_layout_predicts_the_same(old: dict, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", old["store"])
    done = run_main("predict", "--model", f"models:/{MODEL_NAME}/1", *map(str, old["inputs"]), "--out",
                    str(tmp_path / "new"), "--no-seg", "--compile", "off", "--work-dir", str(tmp_path / "work"))
    assert done.returncode == 0, done.stderr
    _assert_same_masks(old["masks"], tmp_path / "new")


def test_its_pyfunc_still_loads_beside_the_moved_package(old: dict, tmp_path: Path) -> None:
    """The registered model carries the old code; a fresh interpreter with today's package installed serves it."""
    case = old["inputs"][0]
    out = tmp_path / "pyfunc.npy"
    script = f"""
import mlflow, numpy as np
mlflow.set_tracking_uri({old['store']!r})
model = mlflow.pyfunc.load_model("models:/{MODEL_NAME}/1")
np.save({str(out)!r}, model.predict({{"path": [{str(case)!r}]}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "UNET_DEVICE": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    expected = np.asarray(nib.load(old["masks"] / case.name).dataobj)
    assert np.array_equal(np.load(out), expected)
