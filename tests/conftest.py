"""Shared fixtures: real data locations and a tiny, fast pipeline config."""

from __future__ import annotations

import os
import tempfile

# Two xdist workers (and the pipeline processes they start) share two cores. OpenMP threads that spin while
# waiting for work then steal the core the other process needs: a tiny evaluation took 14 s in the suite
# against 0.6 s alone. Idle threads that sleep instead halve a pair of busy modules' time (67 s -> 38 s).
# libgomp reads this when torch loads it, so it is set before anything here imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Each test process (an xdist worker) keeps its own folder of live jobs (pipeline/cpus.py): jobs that tests start
# must not take half the CPUs because another worker's test, or a benchmark on the machine, runs beside them.
os.environ.setdefault("UNET_PIPELINE_JOBS_DIR", tempfile.mkdtemp(prefix="unet-pipeline-jobs-"))
# The engine and AOT tests pin torch's runtimes (the package, torch.compile, eager); OpenVINO, the default where it
# imports, has its own tests (tests/inference/test_openvino_runtime.py), which turn it on.
os.environ.setdefault("UNET_PIPELINE_CPU_RUNTIME", "torch")

import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HIPPOCAMPUS = SHARED_DATA / "hippocampus"
DICOM = SHARED_DATA / "dicom"

warnings.filterwarnings("ignore", message=".*nvImageCodec.*")

# A skip for want of data, Orthanc, Chromium, PostgreSQL or a compiler fails the run where UNET_TESTS_STRICT is set
# (`make test` in CI): see tests/strict_skips.py.
pytest_plugins = ["tests.strict_skips"]


@pytest.fixture(autouse=True)
def _no_job_left_registered() -> Iterator[None]:
    """A CLI call made in this process (``main([...])``) registers it as a live job (pipeline/cpus.py) until it
    exits; the next test's jobs must not count it."""
    yield
    from pipeline import cpus

    cpus.end_job()


@pytest.fixture(autouse=True, scope="module")
def _isolated_mlflow_module(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Module-scoped fixtures (runs done once per module) must not follow a store an earlier module set:
    ``mlflow.set_tracking_uri`` exports ``MLFLOW_TRACKING_URI`` for the whole process."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        # The pipeline remembers the URI it exported so as not to take it for the user's: an earlier module's
        # in-process run (another server's) must not make this module's user-set variable look like ours.
        mp.setattr("pipeline.registry.registration._uri_we_set", None)
        # Module fixtures register and predict too: never in the user's own cache.
        mp.setenv("UNET_PIPELINE_CACHE", str(tmp_path_factory.mktemp("model-cache")))
        mp.delenv("UNET_PIPELINE_CACHE_MAX_GB", raising=False)
        yield


@pytest.fixture(autouse=True)
def _isolated_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test picks its own SQLite store in its work dir unless it sets one, as a fresh process would."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr("pipeline.registry.registration._uri_we_set", None)


@pytest.fixture(autouse=True)
def _isolated_model_cache(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every test gets an empty model cache of its own: none touches the user's, none sees another test's copies,
    and none is capped by the user's ``UNET_PIPELINE_CACHE_MAX_GB``."""
    monkeypatch.setenv("UNET_PIPELINE_CACHE", str(tmp_path_factory.mktemp("model-cache")))
    monkeypatch.delenv("UNET_PIPELINE_CACHE_MAX_GB", raising=False)


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    """One headless Chromium per test module (starting one takes seconds); skips where there is none."""
    from tests.quality.report_browser import skip_without_browser, start_chromium

    skip_without_browser()
    browser = start_chromium()
    yield browser
    browser.quit()


@pytest.fixture
def hippocampus() -> Path:
    """The shared real hippocampus MRI (MSD Task04) folder."""
    if not (HIPPOCAMPUS / "dataset.json").is_file():
        pytest.skip(f"real hippocampus data not found at {HIPPOCAMPUS} (see ../shared/data/README.md)")
    return HIPPOCAMPUS


def dicom_series(name: str) -> Path:
    """A shared real DICOM series folder; skips the test when the shared data is absent.

    Args:
        name: the series folder name under ``../shared/data/dicom``.
    """
    folder = DICOM / name
    if not folder.is_dir() or not any(folder.iterdir()):
        pytest.skip(f"shared DICOM series not found at {folder} (see ../shared/data/README.md)")
    return folder


def run_main(*args: str) -> subprocess.CompletedProcess:
    """The CLI's ``main`` in this process (no interpreter start), its output captured like a subprocess's.

    A bug raises here instead of printing a traceback, so a test still sees it; the console entry point
    itself is exercised by the tests that use a real subprocess.

    Args:
        args: the command line after ``unet-pipeline``.
    """
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from pipeline.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(["unet-pipeline", *args], code, out.getvalue(), err.getvalue())


def copy_hippocampus_subset(dst: Path, n: int) -> Path:
    """Copy the first ``n`` real hippocampus cases with a dataset.json into ``dst`` (never write into shared/)."""
    import json

    meta = json.loads((HIPPOCAMPUS / "dataset.json").read_text())
    meta["training"] = meta["training"][:n]
    meta["numTraining"] = n
    for sub in ("imagesTr", "labelsTr"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    for entry in meta["training"]:
        for key in ("image", "label"):
            shutil.copy(HIPPOCAMPUS / entry[key], dst / entry[key])
    (dst / "dataset.json").write_text(json.dumps(meta))
    return dst / "dataset.json"


TINY = {
    "data": {"synthetic_cases": 8, "synthetic_size": [32, 32, 32], "num_folds": 4},
    "model": {"spatial_dims": 3, "features": [8, 16], "norm": "instance", "deep_supervision": False},
    "train": {
        "epochs": 12, "iterations_per_epoch": 4, "batch_size": 2, "patch_size": [24, 24, 24],
        "learning_rate": 0.01, "val_every": 4, "augment": False, "num_threads": 2, "foreground_ratio": 0.5,
    },
    "evaluate": {"overlap": 0.25, "sw_batch_size": 2},
    "mlflow": {"experiment": "tests", "model_name": "tiny-unet"},
    # Compiling each registered tiny model would add seconds to every test that registers one;
    # tests/inference/test_aot.py covers it.
    "registry": {"compile_ahead_of_time": False},
}


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    """A config that trains a tiny 3D U-Net on 8 synthetic 32^3 cases in well under a minute."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """An untrained but valid checkpoint (architecture + plan + weights), for error-path tests."""
    from models.unet import UNet
    from pipeline.inference.checkpoints import save_checkpoint

    kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "features": [4, 8], "norm": "instance",
              "deep_supervision": False}
    plan = {"orientation": "RAS", "target_spacing": [1.0, 1.0, 1.0], "normalization": ["zscore"],
            "ct_stats": [None], "modalities": {"0": "MRI"}, "labels": {"0": "bg", "1": "a", "2": "b"}}
    path = tmp_path / "tiny.pt"
    save_checkpoint({"model": kwargs, "plan": plan, "patch_size": [16, 16, 16],
                     "state_dict": UNet(**kwargs).state_dict()}, path)
    return path


@pytest.fixture
def checkpoint_2mm(tiny_checkpoint: Path) -> Path:
    """``tiny_checkpoint`` with a 2 mm plan and 32^3 windows: the 512 x 512 x 24 series runs in seconds.

    0.43 x 0.43 x 6.5 mm -> 2 mm is coarser in-plane and finer through-plane, so prediction must
    undo a real, anisotropic resampling (and the RAS reorientation) to land on the series' grid.
    Stored inference settings: no mirroring (fast), no postprocessing.
    """
    from pipeline.inference.checkpoints import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint)
    ckpt["plan"]["target_spacing"] = [2.0, 2.0, 2.0]
    ckpt["patch_size"] = [32, 32, 32]
    ckpt["inference"] = {"mirror": False, "overlap": 0.25, "mode": "gaussian", "sw_batch_size": 4}
    path = tiny_checkpoint.with_name("tiny_2mm.pt")
    save_checkpoint({k: v for k, v in ckpt.items() if k != "format"}, path)
    return path


def save_untrained_2mm_model(path: Path) -> Path:
    """A seeded, untrained 2 mm U-Net whose masks hold both labels on the real series (seconds per series).

    Its head's bias favours the foreground labels a little, so the masks are not empty.

    Args:
        path: where to write the checkpoint (its name is the model name in a SEG's series description).
    """
    import torch

    from models.unet import UNet
    from pipeline.inference.checkpoints import save_checkpoint

    torch.manual_seed(7)
    kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "features": [4, 8], "norm": "instance",
              "deep_supervision": False}
    net = UNet(**kwargs)
    with torch.no_grad():
        net.head.bias.copy_(torch.tensor([0.0, 0.3, -0.2]))
    plan = {"orientation": "RAS", "target_spacing": [2.0, 2.0, 2.0], "normalization": ["zscore"], "ct_stats": [None],
            "modalities": {"0": "MRI"}, "labels": {"0": "background", "1": "enhancing", "2": "oedema"}}
    save_checkpoint({"model": kwargs, "plan": plan, "patch_size": [32, 32, 32], "state_dict": net.state_dict(),
                     "inference": {"mirror": False, "overlap": 0.25}}, path)
    return path


def dicom_dataset_maker() -> Any:
    """``scripts/make_dicom_dataset.py`` as a module: real DICOM studies (MR or CT series, SEG, RTSTRUCT) from NIfTI."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_dicom_dataset", REPO / "scripts" / "make_dicom_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
