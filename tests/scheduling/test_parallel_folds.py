"""Folds in parallel on one shared work directory: a lock per fold, one preprocessing, one cross-validation id.

Five real ``unet-pipeline run --fold K`` processes start together on one work directory against a real
``mlflow server`` whose store is PostgreSQL (``tests/postgres.py``; where PostgreSQL is not installed, the
SQLite-backed ``tests/mlflow_server.py`` server instead, said in the test's output). Around it: the lock of one
fold against a real second call, a preprocessing waiter that waits and then reuses, a waiter that gives up with a
clear line, a preprocessing holder killed mid-way, and the id itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import load_config
from pipeline.errors import EXIT_LOCKED, LockHeldError
from pipeline.scheduling import cv_id, fold_lock_path, preprocess_lock, work_dir_lock
from tests.conftest import TINY
from tests.mlflow_server import MlflowServer
from tests.strict_skips import strict

pytestmark = pytest.mark.slow
pytest_plugins = ["tests.postgres"]  # the session's postgres_mlflow_server, when PostgreSQL is installed

REPO = Path(__file__).resolve().parents[2]
FOLDS = 5
EPOCHS = 2
EXPERIMENT = "parallel-folds"
MODEL = "parallel-folds-unet"


def _cli(*args: str) -> list[str]:
    """The installed console script, as a Slurm array task or a Kubernetes pod runs it."""
    return [str(Path(sys.executable).with_name("unet-pipeline")), *args]


def _config(path: Path, uri: str | None) -> Path:
    """Five synthetic cases (one validation case per fold), a tiny network, two epochs, no extras."""
    cfg = json.loads(json.dumps(TINY))
    cfg["data"] = {"synthetic_cases": FOLDS, "synthetic_size": [32, 32, 32], "num_folds": FOLDS}
    cfg["model"]["features"] = [4, 8]
    # One thread each: five jobs share two cores.
    cfg["train"].update({"epochs": EPOCHS, "iterations_per_epoch": 2, "val_every": EPOCHS, "num_threads": 1})
    cfg["evaluate"].update({"mirror": False, "qc_images": False, "postprocess": False})
    cfg["registry"]["gate_lease_s"] = 10  # the five gates take turns: look at the queue every second
    cfg["mlflow"] = {"experiment": EXPERIMENT, "model_name": MODEL, **({"tracking_uri": uri} if uri else {})}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def tracking_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The PostgreSQL-backed server of ``tests/postgres.py``; without PostgreSQL, a SQLite-backed one."""
    try:
        uri = request.getfixturevalue("postgres_mlflow_server").uri
    except pytest.skip.Exception as why:
        if strict():
            raise  # CI has PostgreSQL: the lab's server, not the fallback, is what this must run against there
        print(f"PostgreSQL-backed server unavailable ({why}); using the SQLite-backed mlflow server")
        uri = None
    if uri is not None:
        yield uri
        return
    server = MlflowServer(tmp_path_factory.mktemp("parallel-folds-server"))
    server.start()
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.fixture(scope="module")
def five_folds(tracking_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``run --fold 0..4`` started at once on one work directory; waits for all five."""
    root = tmp_path_factory.mktemp("parallel-folds")
    config = _config(root / "cv.yaml", tracking_server)
    work = root / "work"
    env = {**os.environ, "UNET_PIPELINE_CACHE": str(root / "cache")}
    env.pop("MLFLOW_TRACKING_URI", None)
    logs, procs = [], []
    started = time.monotonic()
    for fold in range(FOLDS):
        logs.append(root / f"fold_{fold}.err")
        with logs[-1].open("w") as err:
            procs.append(subprocess.Popen(_cli("run", str(config), "--work-dir", str(work), "--fold", str(fold)),
                                          stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=root))
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    print(f"five fold jobs together: {time.monotonic() - started:.0f} s wall")
    return {"config": config, "work": work, "uri": tracking_server, "codes": codes,
            "stderr": [log.read_text() for log in logs]}


def _runs(five_folds: dict) -> tuple[Any, list]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=five_folds["uri"], registry_uri=five_folds["uri"])  # not a store set earlier
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client, client.search_runs([experiment.experiment_id])


def test_five_fold_jobs_on_one_work_dir_all_finish_with_preprocessing_once(five_folds: dict) -> None:
    for fold, (code, err) in enumerate(zip(five_folds["codes"], five_folds["stderr"])):
        assert code == 0, f"fold {fold} exited {code}:\n{err[-3000:]}"
    work = five_folds["work"]
    client, runs = _runs(five_folds)
    assert len(runs) == FOLDS and len({r.info.run_id for r in runs}) == FOLDS
    assert sorted(r.data.tags["cv.fold"] for r in runs) == [str(k) for k in range(FOLDS)]
    assert all(r.info.status == "FINISHED" for r in runs)
    # One job preprocessed every case; the four others reused its cache (they waited for it or came after).
    done = {r.data.tags["cv.fold"]: int(r.data.tags["preprocess.cases_preprocessed"]) for r in runs}
    assert sorted(done.values()) == [0] * (FOLDS - 1) + [FOLDS], done
    waits = [err for err in five_folds["stderr"] if "to finish preprocessing" in err]
    for err in waits:
        assert "waiting for fold " in err and "'s job (pid " in err and "reusing the preprocessed data" in err, err[-2000:]
    # The same cross-validation id on all five: this config (any fold) and this data.
    states = [json.loads((work / "state" / f"fold_{k}.json").read_text()) for k in range(FOLDS)]
    assert all(s["status"] == "completed" for s in states) and len({s["data_hash"] for s in states}) == 1
    expected = cv_id(load_config(five_folds["config"], ["data.fold=3"]).to_dict(), states[0]["data_hash"])
    assert {r.data.tags["cv.id"] for r in runs} == {expected}
    assert "/" not in expected and len(expected) == 16
    # No lost metric: every run holds every epoch's training loss and its final validation.
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), run.data.tags["cv.fold"]
        assert "val_mean_dice" in run.data.metrics and "best_val_dice" in run.data.metrics
    # Each fold evaluated into its own folder; nothing was left in the outbox.
    for k in range(FOLDS):
        assert json.loads((work / "evaluation" / f"fold_{k}" / "summary.json").read_text())["num_cases"] == 1
    assert not list(work.glob("mlflow-outbox/*.jsonl"))
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert len(versions) == FOLDS



def test_then_the_five_folds_register_as_one_ensemble_that_predicts(five_folds: dict) -> None:
    """The acceptance's last step: once the five jobs are done, ``ensemble`` registers them and the version predicts."""
    import mlflow
    import nibabel as nib
    import numpy as np

    from pipeline.data.demo import make_demo_dataset
    from tests.conftest import run_main

    root = five_folds["work"].parent
    held_out = make_demo_dataset(root / "held_out", 2, [32, 32, 32], seed=11).parent  # no fold trained on these
    done = run_main("ensemble", str(five_folds["config"]), "--work-dir", str(five_folds["work"]),
                    "--evaluation-set", str(held_out))
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=five_folds["uri"], registry_uri=five_folds["uri"])
    ensembles = [v for v in client.search_model_versions(f"name = '{MODEL}'")
                 if v.tags.get("model.kind") == "fold_ensemble"]
    assert len(ensembles) == 1
    version = ensembles[0]
    _, runs = _runs(five_folds)
    fold_runs = {r.info.run_id for r in runs if "cv.fold" in r.data.tags}
    assert {version.tags[f"ensemble.fold_{k}.run_id"] for k in range(FOLDS)} == fold_runs
    image = sorted((held_out / "imagesTr").glob("*.nii.gz"))[0]
    out = root / "ensemble-masks"
    # A colleague's shell: a new process with only the server's address.
    env = {**os.environ, "MLFLOW_TRACKING_URI": five_folds["uri"], "UNET_PIPELINE_CACHE": str(root / "cache")}
    done = subprocess.run(_cli("predict", "--model", f"models:/{MODEL}/{version.version}", str(image), "--out", str(out),
                               "--work-dir", str(root / "colleague"), "--no-seg"),
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    mask = nib.load(out / image.name)
    assert mask.shape == nib.load(image).shape and set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}


def test_cv_id_changes_with_data_folds_and_seed_but_not_with_the_fold(tmp_path: Path) -> None:
    base = load_config(_config(tmp_path / "c.yaml", None), []).to_dict()

    def with_data(**data) -> dict:
        return {**base, "data": {**base["data"], **data}}

    same = {cv_id(with_data(fold=k), "d" * 64) for k in range(FOLDS)}
    assert len(same) == 1
    one = same.pop()
    assert cv_id(with_data(dataset="/elsewhere/Task04/dataset.json"), "d" * 64) == one  # by content, not path
    assert cv_id(base, "e" * 64) != one
    assert cv_id(with_data(split_seed=1), "d" * 64) != one
    assert cv_id(with_data(num_folds=4), "d" * 64) != one
    assert cv_id({**base, "train": {**base["train"], "epochs": 3}}, "d" * 64) != one


HOLDER = """
import sys, time
from pathlib import Path
from pipeline.scheduling import preprocess_lock
with preprocess_lock(Path(sys.argv[1]), "run", int(sys.argv[2])):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def hold():
    """Start real other processes that take the preprocessing lock as fold K's job and sleep; kill them after."""
    procs = []

    def start(work: Path, fold: int) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(work), str(fold)], cwd=REPO,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()


def test_the_same_fold_twice_exits_3_while_other_folds_are_free(tmp_path: Path) -> None:
    """This test holds fold 2 as its job would; a real second ``run --fold 2`` is refused at once."""
    work = tmp_path / "work"
    config = _config(tmp_path / "c.yaml", None)
    with work_dir_lock(work, "run", 2):
        assert json.loads(fold_lock_path(work, 2).read_text())["fold"] == 2
        second = subprocess.run(_cli("run", str(config), "--work-dir", str(work), "--fold", "2"), capture_output=True,
                                text=True, timeout=120)
        for fold in (0, 1, 3, 4):  # the other folds' locks are free, and the whole-directory lock too
            with work_dir_lock(work, "run", fold):
                pass
        with work_dir_lock(work, "pacs watch"):
            pass
    assert second.returncode == EXIT_LOCKED == 3, second.stderr
    errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"fold 2 of {work} is in use by pid {os.getpid()}" in errors[0] and "exits without doing anything" in errors[0]
    assert not (work / "preprocessed").exists()  # refused before any work


def test_a_preprocessing_waiter_waits_then_reuses_the_cache(tmp_path: Path) -> None:
    """Fold 0's job (this test) preprocesses under the lock; fold 1's real job waits, then reuses all of it."""
    from pipeline.data import preprocess_dataset, stored_splits
    from pipeline.stages import discover
    from pipeline.training import resolve_device

    work = tmp_path / "work"
    config = _config(tmp_path / "c.yaml", None)
    cfg = load_config(config, ["data.fold=0"])
    err = tmp_path / "waiter.err"
    with preprocess_lock(work, "run", 0):
        with err.open("w") as f:
            waiter = subprocess.Popen(_cli("preprocess", str(config), "--work-dir", str(work), "--fold", "1"),
                                      stdout=subprocess.PIPE, stderr=f, text=True)
        try:
            deadline = time.monotonic() + 120
            while "waiting for fold 0's job" not in err.read_text():
                assert waiter.poll() is None and time.monotonic() < deadline, err.read_text()
                time.sleep(0.2)
            dataset = discover(cfg, work)
            done = preprocess_dataset(cfg, dataset, work / "preprocessed", resolve_device("cpu"))
            stored_splits([c.case_id for c in done.cases], FOLDS, cfg.data.split_seed, work / "splits.json")
            written = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (work / "preprocessed").glob("*.npz")}
            assert len(written) == FOLDS and waiter.poll() is None  # still waiting
        except BaseException:
            waiter.kill()
            raise
    out, _ = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, err.read_text()
    assert f"Preprocessed {FOLDS} case(s)" in out
    log = err.read_text()
    assert log.count(f"waiting for fold 0's job (pid {os.getpid()} on host ") == 1, log
    assert "reusing the preprocessed data where it is up to date" in log
    # Reused, not redone: the very same files (inode and modification time).
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (work / "preprocessed").glob("*.npz")} == written


def test_a_waiter_gives_up_with_one_clear_line_and_takes_over_from_a_killed_holder(hold, tmp_path: Path) -> None:
    work = tmp_path / "work"
    holder = hold(work, 4)
    with pytest.raises(LockHeldError) as info:
        with preprocess_lock(work, "run", 1, timeout_s=1):
            pytest.fail("must not preprocess while fold 4's job does")
    message = str(info.value)
    assert f"waited 1 s for fold 4's job (pid {holder.pid} on host " in message and "\n" not in message
    assert "finish preprocessing" in message and info.value.exit_code == EXIT_LOCKED
    holder.send_signal(signal.SIGKILL)  # killed mid-preprocessing: the kernel frees its lock
    holder.wait(timeout=30)
    with preprocess_lock(work, "run", 1, timeout_s=30) as path:
        assert json.loads(path.read_text())["fold"] == 1


def test_a_job_killed_while_preprocessing_leaves_nothing_the_rerun_trusts(tmp_path: Path) -> None:
    """What a SIGKILL between writing a case and recording it leaves: a rerun redoes exactly those cases."""
    from pipeline.stages import prepare

    work = tmp_path / "work"
    cfg = load_config(_config(tmp_path / "c.yaml", None), [])
    first = prepare(cfg, work)
    assert first.preprocessed == FOLDS
    out = work / "preprocessed"
    manifest = json.loads((out / "manifest.json").read_text())
    victim, torn = sorted(manifest)[:2]
    # Killed after the rename of `victim`'s file but before the manifest recorded it...
    del manifest[victim]
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / f"{victim}.npz").write_bytes(b"not the case it claims to be")
    # ...and killed while writing `torn`'s temporary file (the final name still holds the last good one).
    (out / f"{torn}.npz.tmp.npz").write_bytes(b"PK\x03\x04 half a zip")
    again = prepare(cfg, work)
    assert again.preprocessed == 1
    image, label = again.cases[victim].load()
    assert image.ndim == 4 and label.shape[1:] == image.shape[1:]
    assert prepare(cfg, work).preprocessed == 0


CONNECT = """
import sys, time
from pathlib import Path
from pipeline.scheduling import RunSession
session = RunSession(Path(sys.argv[1]), int(sys.argv[2]), None, "parallel-folds", 0.5, False)
while time.time() < float(sys.argv[3]):  # all start connecting at the same moment
    time.sleep(0.01)
session.connect()
print(session.uri)
"""


def test_fold_jobs_without_a_server_create_the_work_dirs_sqlite_store_one_at_a_time(tmp_path: Path) -> None:
    """Without the store lock, MLflow's schema migrations of a new ``mlflow.db`` run at once and fail."""
    work = tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    at = time.time() + 9  # after every interpreter has imported MLflow
    procs = [subprocess.Popen([sys.executable, "-c", CONNECT, str(work), str(fold), str(at)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for fold in range(3)]
    results = [p.communicate(timeout=180) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err[-3000:]
        assert out.strip() == f"sqlite:///{(work / 'mlflow.db').resolve()}"
