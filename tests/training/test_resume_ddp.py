"""Exact resume after SIGKILL, and DistributedDataParallel with two CPU processes under torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import TINY

pytestmark = pytest.mark.slow


def _config(tmp_path: Path, **train: object) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["train"].update(train)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _client(work: Path):
    import mlflow

    uri = f"sqlite:///{(work / 'mlflow.db').resolve()}"
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _epoch_of(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except (OSError, RuntimeError, KeyError, EOFError):
        return 0


def test_sigkill_mid_epoch_then_resume(tmp_path: Path) -> None:
    epochs = 8
    config = _config(tmp_path, epochs=epochs, iterations_per_epoch=6, val_every=2)
    work = tmp_path / "work"
    last = work / "checkpoints" / "fold_0" / "last.pt"
    cmd = [sys.executable, "-m", "pipeline", "train", str(config), "--work-dir", str(work)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while _epoch_of(last) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(0.4)  # into the next epoch, between checkpoints
    assert proc.poll() is None, "training finished before it could be killed; make the config longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _epoch_of(last)
    assert 3 <= killed_at < epochs
    client = _client(work)
    runs_before = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert len(runs_before) == 1
    run_id = runs_before[0].info.run_id

    res = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["epoch"] == epochs and state["mlflow_run_id"] == run_id
    runs_after = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert [r.info.run_id for r in runs_after] == [run_id]  # the run continued, no new one
    steps = sorted({m.step for m in client.get_metric_history(run_id, "train_loss")})
    assert steps == list(range(1, epochs + 1))
    # Exact: the same weights as one uninterrupted run of the same config.
    from pipeline.cli import main

    straight = tmp_path / "straight"
    assert main(["train", str(config), "--work-dir", str(straight)]) == 0
    reference = torch.load(straight / "checkpoints" / "fold_0" / "last.pt", map_location="cpu", weights_only=True)
    for key, value in reference["state_dict"].items():
        torch.testing.assert_close(state["state_dict"][key], value, rtol=1e-5, atol=1e-6)
    # The resumed model loads and predicts.
    from pipeline.inference.model import load_model

    model = load_model(work / "checkpoints" / "fold_0" / "best.pt", torch.device("cpu"))
    with torch.no_grad():
        assert model.network(torch.zeros(1, 1, 24, 24, 24)).shape == (1, 3, 24, 24, 24)


def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    config = _config(tmp_path, epochs=3, iterations_per_epoch=2, val_every=1, num_threads=1)
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29571",
           "-m", "pipeline", "train", str(config), "--work-dir", str(work)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    client = _client(work)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert len(runs) == 1  # only rank 0 logs
    run = runs[0]
    assert run.data.params["ddp.world_size"] == "2"
    checksums = json.loads(run.data.tags["ddp.param_checksums"])
    assert len(checksums) == 2 and checksums[0] == pytest.approx(checksums[1], rel=0, abs=1e-9)
    # One checkpoint writer: exactly rank 0's files, no per-rank copies or temp files left.
    files = sorted(p.name for p in (work / "checkpoints").rglob("*") if p.is_file())
    assert files == ["best.pt", "final.pt", "history.jsonl", "last.pt", "training_curves.png"]
    history = (work / "checkpoints" / "fold_0" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in history] == [1, 2, 3]  # one line per epoch: one writer
    assert res.stdout.count("MLflow run id:") == 1
