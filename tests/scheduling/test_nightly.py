"""Nightly runs against a real ``mlflow server``: the champion gate, provenance, pictures, privacy, outages,
the lock, automatic resume, skip-if-unchanged and exit codes."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image as mpimg
import nibabel as nib
import pytest
import yaml

from tests.conftest import TINY, run_main
from tests.mlflow_server import MlflowServer, free_port, mlflow_server  # noqa: F401

pytestmark = pytest.mark.slow
MODEL = "nightly-unet"


def _dataset(root: Path, n: int = 8, seed: int = 5) -> Path:
    from pipeline.data.demo import make_demo_dataset

    return make_demo_dataset(root, n, [32, 32, 32], seed=seed).parent


def _config(path: Path, dataset: Path, uri: str | None, **sections: dict) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["data"] = {"dataset": str(dataset), "num_folds": 4}
    cfg["mlflow"] = {"experiment": "nightly", "model_name": MODEL, "outage_wait_minutes": 2.0,
                     **({"tracking_uri": uri} if uri else {})}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _client(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _artifact_text(client, run_id: str, path: str, tmp: Path) -> str:
    return Path(client.download_artifacts(run_id, path, str(tmp))).read_text()


# ------------------------------------------------------------------ the gate, against a real server


@pytest.fixture(scope="module")
def gated(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> dict:  # noqa: F811
    """Three runs on one server and one dataset: a moderate model, a worse one, a better one."""
    root = tmp_path_factory.mktemp("gate")
    dataset = _dataset(root / "Jane_Doe_1962_scans")  # a folder name that carries a patient's name
    work = root / "work"
    uri = mlflow_server.uri
    runs = {}
    for name, train, extra in (("first", {"epochs": 4}, []),
                               ("worse", {"epochs": 4, "learning_rate": 0.0}, ["--fail-if-not-promoted"]),
                               ("better", {"epochs": 16}, [])):
        config = _config(root / f"{name}.yaml", dataset, uri, train=train)
        res = run_main("run", str(config), "--work-dir", str(work), *extra)
        runs[name] = res
        summary = json.loads((work / "evaluation" / "fold_0" / "summary.json").read_text())
        runs[f"{name}_summary"] = summary
    return {"root": root, "work": work, "uri": uri, "dataset": dataset, **runs}


def test_worse_run_stays_candidate_better_run_takes_champion(gated: dict) -> None:
    client = _client(gated["uri"])
    assert gated["first"].returncode == 0, gated["first"].stderr[-2000:]
    assert gated["worse"].returncode == 6, gated["worse"].stderr[-2000:]  # --fail-if-not-promoted
    assert "registered but not promoted" in gated["worse"].stderr
    assert gated["better"].returncode == 0, gated["better"].stderr[-2000:]
    versions = {int(v.version): v for v in client.search_model_versions(f"name='{MODEL}'")}
    assert sorted(versions) == [1, 2, 3]
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "3"
    assert str(client.get_model_version_by_alias(MODEL, "candidate").version) == "3"
    tags = {v: versions[v].tags for v in versions}
    assert tags[1]["gate.decision"] == "promoted: there was no champion"
    assert tags[2]["gate.decision"].startswith("not promoted") and tags[2]["gate.champion_version"] == "1"
    assert tags[3]["gate.decision"].startswith("promoted: mean Dice") and tags[3]["gate.champion_version"] == "1"
    assert float(tags[3]["gate.candidate_mean_dice"]) > float(tags[3]["gate.champion_mean_dice"])
    assert float(tags[2]["gate.candidate_mean_dice"]) <= float(tags[2]["gate.champion_mean_dice"])
    decision = client.get_run(versions[2].run_id).data.tags["registry.decision"]
    assert decision.startswith("not promoted: mean Dice") and decision.endswith("champion stays version 1"), decision
    assert gated["worse_summary"]["mean_dice"] < gated["first_summary"]["mean_dice"]


def test_candidate_and_champion_were_scored_on_the_same_cases_in_one_call(gated: dict, tmp_path: Path) -> None:
    client = _client(gated["uri"])
    v1, v2 = client.get_model_version(MODEL, "1"), client.get_model_version(MODEL, "2")
    table = list(csv.DictReader(io.StringIO(_artifact_text(client, v2.run_id, "gate/comparison.csv", tmp_path / "a"))))
    labels = ["dim sphere", "bright sphere"]
    assert table and {"case", *[f"candidate {n}" for n in labels], *[f"champion {n}" for n in labels]} <= set(table[0])
    assert all(r["champion dim sphere"] != "" and r["candidate dim sphere"] != "" for r in table)
    # The champion's column is version 1 re-scored in this call with its own stored settings: on the same
    # cases it reproduces version 1's own validation scores exactly.
    own = {r["case"]: r for r in csv.DictReader(io.StringIO(
        _artifact_text(client, v1.run_id, "evaluation/cases.csv", tmp_path / "b")))}
    assert {r["case"] for r in table} == set(own)
    for r in table:
        for n in labels:
            assert float(r[f"champion {n}"]) == pytest.approx(float(own[r["case"]][n]), abs=1e-6)
    metrics = client.get_run(v2.run_id).data.metrics
    assert metrics["gate.champion_mean_dice"] == pytest.approx(client.get_run(v1.run_id).data.metrics["val_mean_dice"])
    assert metrics["gate.promoted"] == 0.0 and metrics["gate.margin"] == 0.0


def test_versions_carry_description_and_provenance(gated: dict) -> None:
    client = _client(gated["uri"])
    version = client.get_model_version(MODEL, "3")
    tags = version.tags
    from pipeline.data.preprocess import ContentHashes, dataset_hash

    for key in ("data.name", "data.num_cases", "data.content_sha256", "config.sha256", "code.package_version",
                "code.git_commit", "data.fold", "plan.patch_size", "plan.spacing_mm", "val.dice.dim_sphere",
                "val.dice.bright_sphere", "gate.decision", "inference.mirror"):
        assert tags.get(key) not in (None, ""), key
    assert tags["data.name"] == "SyntheticSpheres" and tags["data.num_cases"] == "8" and tags["data.fold"] == "0"
    # The content hash is the dataset's, recomputed here from the files.
    from pipeline.data.dataset import load_dataset

    ds = load_dataset(gated["dataset"])
    hashes = ContentHashes(gated["root"] / "hash-cache.json")
    assert tags["data.content_sha256"] == dataset_hash(ds, {c.case_id: hashes.of_case(c) for c in ds.cases})
    text = version.description
    assert "SyntheticSpheres" in text and "| dim sphere |" in text and f"models:/{MODEL}/3" in text
    assert "mlflow.pyfunc.load_model" in text and "Champion gate: promoted" in text


def test_predict_from_the_alias(gated: dict, tmp_path: Path) -> None:
    image = sorted((gated["dataset"] / "imagesTr").glob("*.nii.gz"))[0]
    out = tmp_path / "pred"
    res = _cli("predict", "--model", f"models:/{MODEL}@champion", str(image), "--out", str(out),
               "--work-dir", str(gated["work"]), env={"MLFLOW_TRACKING_URI": gated["uri"]})
    assert res.returncode == 0, res.stderr[-2000:]
    assert nib.load(out / image.name).shape == nib.load(image).shape


def test_pictures_are_real_images_listed_in_the_run(gated: dict, tmp_path: Path) -> None:
    client = _client(gated["uri"])
    run_id = client.get_model_version(MODEL, "3").run_id
    qc = [a.path for a in client.list_artifacts(run_id, "qc")]
    plots = [a.path for a in client.list_artifacts(run_id, "plots")]
    assert plots == ["plots/training_curves.png"]
    assert len(qc) == 2 and all(p.startswith("qc/case-") and p.endswith(".png") for p in qc)
    for path, size in [(plots[0], (400, 1200)), *[(p, (440, 1200)) for p in qc]]:
        image = mpimg.imread(client.download_artifacts(run_id, path, str(tmp_path)))
        assert image.shape[:2] == size, path
        assert float(image[..., :3].std()) > 0.05, f"{path} looks blank"


def test_nothing_path_like_or_case_named_reaches_mlflow(gated: dict, tmp_path: Path) -> None:
    client = _client(gated["uri"])
    run_id = client.get_model_version(MODEL, "3").run_id
    run = client.get_run(run_id)
    case_ids = [p.name.removesuffix(".nii.gz") for p in (gated["dataset"] / "imagesTr").glob("*.nii.gz")]
    secrets = [str(gated["dataset"]), gated["dataset"].name, *case_ids]
    texts = [json.dumps(run.data.params), json.dumps(run.data.tags),
             json.dumps(client.get_model_version(MODEL, "3").tags)]

    def walk(path: str = "") -> list[str]:
        out = []
        for a in client.list_artifacts(run_id, path):
            out += walk(a.path) if a.is_dir else [a.path]
        return out

    names = walk()
    texts.append("\n".join(names))
    for name in names:
        if name.endswith((".json", ".csv", ".yaml", ".txt")):
            texts.append(_artifact_text(client, run_id, name, tmp_path / name.replace("/", "_")))
    leaks = [s for s in secrets for t in texts if s in t]
    assert not leaks, leaks
    assert run.data.params["data.dataset"].startswith("SyntheticSpheres (sha256 ")


# ------------------------------------------------------------------ lock, resume, skip (SQLite store)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _history_lines(work: Path) -> int:
    history = work / "checkpoints" / "fold_0" / "history.jsonl"
    return len(history.read_text().splitlines()) if history.is_file() else 0


def test_lock_then_sigkill_then_plain_run_resumes_then_skips_then_new_case_trains(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path / "data")
    config = _config(tmp_path / "c.yaml", dataset, None, train={"epochs": 40, "iterations_per_epoch": 6})
    work = tmp_path / "work"
    first = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(config), "--work-dir", str(work)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = work / "locks" / "fold_0.lock"
        _wait_for(lambda: lock.is_file() and lock.read_text().strip(), 120, "the lock")
        # A second call on the same work dir while the first holds the lock: exits at once with code 3.
        second = _cli("run", str(config), "--work-dir", str(work), timeout=120)
        assert second.returncode == 3, second.stderr
        errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and f"pid {first.pid}" in errors[0] and "in use" in errors[0], second.stderr
        _wait_for(lambda: _history_lines(work) >= 3, 300, "three epochs")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    state = json.loads((work / "state" / "fold_0.json").read_text())
    assert state["status"] == "running"
    interrupted_run = state["run_id"]
    # A plain call (no --resume) continues the same MLflow run to the end. The calls after the kill run in
    # this process (no interpreter start); the two above are real processes, as a scheduler starts them.
    res = run_main("run", str(config), "--work-dir", str(work))
    assert res.returncode == 0, res.stderr[-3000:]
    state = json.loads((work / "state" / "fold_0.json").read_text())
    assert state["status"] == "completed" and state["run_id"] == interrupted_run
    client = _client(f"sqlite:///{work / 'mlflow.db'}")
    run = client.get_run(interrupted_run)
    assert run.info.status == "FINISHED"
    assert sorted({m.step for m in client.get_metric_history(interrupted_run, "train_loss")}) == list(range(1, 41))
    experiment = client.get_experiment_by_name("nightly").experiment_id
    assert len(client.search_runs([experiment])) == 1

    # Unchanged data, config and code: exit 0 without training.
    stamp = (work / "checkpoints" / "fold_0" / "final.pt").stat().st_mtime_ns
    res = run_main("run", str(config), "--work-dir", str(work))
    assert res.returncode == 0 and "Up to date" in res.stdout, res.stdout + res.stderr
    assert (work / "checkpoints" / "fold_0" / "final.pt").stat().st_mtime_ns == stamp
    assert len(client.search_runs([experiment])) == 1

    # One new case in the dataset: the next plain call trains a new run on 9 cases.
    extra = _dataset(tmp_path / "extra", n=1, seed=11)
    meta = json.loads((dataset / "dataset.json").read_text())
    for sub in ("imagesTr", "labelsTr"):
        src = next((extra / sub).glob("*.nii.gz"))
        (dataset / sub / "demo_new.nii.gz").write_bytes(src.read_bytes())
    meta["training"].append({"image": "./imagesTr/demo_new.nii.gz", "label": "./labelsTr/demo_new.nii.gz"})
    (dataset / "dataset.json").write_text(json.dumps(meta))
    res = run_main("run", str(config), "--work-dir", str(work))
    assert res.returncode == 0 and "Up to date" not in res.stdout, res.stderr[-2000:]
    runs = client.search_runs([experiment])
    assert len(runs) == 2
    newest = max(runs, key=lambda r: r.info.start_time)
    assert newest.data.params["data.num_cases"] == "9"
    manifest = json.loads((work / "preprocessed" / "manifest.json").read_text())
    assert "demo_new" in manifest


# ------------------------------------------------------------------ the tracking server as a real dependency


def test_server_down_at_start_stops_before_preprocessing(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path / "data")
    uri = f"http://127.0.0.1:{free_port()}"
    config = _config(tmp_path / "c.yaml", dataset, uri)
    work = tmp_path / "work"
    res = run_main("run", str(config), "--work-dir", str(work))
    assert res.returncode == 5, res.stderr
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and uri in errors[0] and "cannot be reached" in errors[0], res.stderr
    assert not (work / "preprocessed").exists() and not (work / "checkpoints").exists()


def test_server_killed_mid_run_and_restarted_loses_no_metric(tmp_path: Path) -> None:
    server = MlflowServer(tmp_path / "server")
    server.start()
    try:
        dataset = _dataset(tmp_path / "data")
        epochs = 12
        config = _config(tmp_path / "c.yaml", dataset, server.uri, train={"epochs": epochs, "iterations_per_epoch": 6})
        work = tmp_path / "work"
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(config), "--work-dir", str(work)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait_for(lambda: _history_lines(work) >= 3, 300, "three epochs")
            server.stop()
            at_stop = _history_lines(work)
            _wait_for(lambda: _history_lines(work) >= at_stop + 3, 300, "three epochs with the server down")
            assert list((work / "mlflow-outbox").glob("*.jsonl")), "nothing kept on disk during the outage"
            server.start()
            out, err = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err[-3000:]
        client = _client(server.uri)
        run_id = json.loads((work / "state" / "fold_0.json").read_text())["run_id"]
        assert client.get_run(run_id).info.status == "FINISHED"
        for metric in ("train_loss", "lr"):
            steps = [m.step for m in client.get_metric_history(run_id, metric)]
            assert sorted(set(steps)) == list(range(1, epochs + 1)), (metric, steps)
        assert not [p for p in (work / "mlflow-outbox").glob("*.jsonl") if p.read_text().strip()]
        assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    finally:
        server.stop()


def test_diverging_training_exits_4(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path / "data")
    config = _config(tmp_path / "c.yaml", dataset, None, train={"epochs": 3, "learning_rate": 1.0e12})
    work = tmp_path / "work"
    res = run_main("run", str(config), "--work-dir", str(work))
    assert res.returncode == 4, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "diverged" in errors[0]
    assert json.loads((work / "state" / "fold_0.json").read_text())["status"] == "failed"
    client = _client(f"sqlite:///{work / 'mlflow.db'}")
    run_id = json.loads((work / "state" / "fold_0.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "FAILED"
