"""A fold ensemble registered as one model: three real folds on a real ``mlflow server``, then one version that predicts with all.

The folds train on the embedded demo dataset (tiny, seconds each) with a fixed evaluation set of
other synthetic cases none of them trained on; ``unet-pipeline ensemble`` registers the three as one
version, and ``predict``, ``evaluate`` and the MLflow pyfunc use that version like any model.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from pipeline.data import make_demo_dataset
from pipeline.errors import InputDataError, PipelineError
from pipeline.inference import Predictor, load_checkpoint, load_model, load_models, save_checkpoint, save_ensemble
from tests.conftest import TINY, run_main
from tests.mlflow_server import mlflow_server  # noqa: F401

pytestmark = pytest.mark.slow
MODEL = "ensemble-unet"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folds(tmp_path_factory: pytest.TempPathFactory, mlflow_server) -> dict:  # noqa: F811
    """Three folds run one after the other in one work directory, then the ensemble registered from them."""
    root = tmp_path_factory.mktemp("ensemble")
    held_out = make_demo_dataset(root / "held_out", 3, [32, 32, 32], seed=11)  # none of the folds trains on these
    cfg = copy.deepcopy(TINY)
    cfg["data"]["num_folds"] = 3
    cfg["train"].update({"epochs": 2, "iterations_per_epoch": 3, "val_every": 2})
    cfg["evaluate"].update({"qc_images": False, "mirror": False})  # 8 times cheaper; each fold's own setting is kept
    cfg["mlflow"] = {"experiment": "ensemble", "model_name": MODEL, "tracking_uri": mlflow_server.uri}
    cfg["registry"]["evaluation_set"] = str(held_out)
    config = root / "folds.yaml"
    config.write_text(yaml.safe_dump(cfg))
    work = root / "work"
    for fold in range(3):
        done = run_main("run", str(config), "--fold", str(fold), "--work-dir", str(work))
        assert done.returncode == 0, done.stderr[-2000:]
    done = run_main("ensemble", str(config), "--work-dir", str(work))
    assert done.returncode == 0, done.stderr[-2000:]
    again = run_main("ensemble", str(config), "--work-dir", str(work))
    assert again.returncode == 0, again.stderr[-2000:]
    runs = [json.loads((work / "state" / f"fold_{k}.json").read_text())["run_id"] for k in range(3)]
    mlflow.set_tracking_uri(mlflow_server.uri)
    mlflow.set_registry_uri(mlflow_server.uri)
    return {"root": root, "config": config, "work": work, "held_out": held_out, "runs": runs, "out": done.stdout,
            "again": again.stdout, "uri": mlflow_server.uri}


@pytest.fixture
def server_env(folds: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    """``predict`` and ``evaluate`` find the registry where a user's shell would say: ``MLFLOW_TRACKING_URI``."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", folds["uri"])
    mlflow.set_tracking_uri(folds["uri"])
    mlflow.set_registry_uri(folds["uri"])
    return folds


def _ensemble_versions() -> list:
    found = mlflow.MlflowClient().search_model_versions(f"name='{MODEL}'")
    return [v for v in found if v.tags.get("model.kind") == "fold_ensemble"]


def _scan(folds: dict, i: int = 0) -> Path:
    return sorted((folds["held_out"].parent / "imagesTr").glob("*.nii.gz"))[i]


def test_one_version_registers_the_three_folds_with_their_provenance(server_env: dict) -> None:
    folds = server_env
    versions = _ensemble_versions()
    assert len(versions) == 1, "the second call must find the ensemble registered and register nothing"
    assert "Up to date" in folds["again"]
    v = mlflow.MlflowClient().get_model_version(MODEL, versions[0].version)
    fold_versions = {k: mlflow.MlflowClient().search_model_versions(f"name='{MODEL}' and run_id='{r}'")[0].version
                     for k, r in enumerate(folds["runs"])}
    for k, run_id in enumerate(folds["runs"]):
        assert run_id in v.description
        assert v.tags[f"ensemble.fold_{k}.run_id"] == run_id
        assert v.tags[f"ensemble.fold_{k}.version"] == str(fold_versions[k])
        dice = mlflow.MlflowClient().get_run(run_id).data.metrics["val_mean_dice"]
        assert v.tags[f"ensemble.fold_{k}.val_mean_dice"] == f"{dice:.4f}"
    assert v.tags["ensemble.fold_runs"] == ",".join(folds["runs"])
    cv_ids = {mlflow.MlflowClient().get_run(r).data.tags.get("cv.id") for r in folds["runs"]}
    assert cv_ids == {v.tags["cv.id"]} == {mlflow.MlflowClient().get_run(v.run_id).data.tags["cv.id"]}
    assert "3-fold ensemble" in v.description and "/work" not in v.description  # no local paths leave
    # Its own run, gated on the fixed evaluation set against the champion before it.
    assert v.run_id not in folds["runs"]
    assert v.tags["gate.eval_set"].startswith("fixed evaluation set") and v.tags["gate.num_cases"] == "3"
    assert v.tags["gate.champion_version"] in {str(n) for n in fold_versions.values()}
    assert "candidate" in mlflow.MlflowClient().get_model_version(MODEL, v.version).aliases
    assert f"{MODEL} version {v.version}" in folds["out"]


def test_registered_ensemble_averages_the_three_folds_probabilities(server_env: dict) -> None:
    folds = server_env
    from pipeline.stages import load_predictor

    predictor, identity = load_predictor([f"models:/{MODEL}/{_ensemble_versions()[0].version}"], folds["work"])
    assert len(predictor.models) == 3 and identity.name == MODEL
    fold_models = [load_model(folds["work"] / "checkpoints" / f"fold_{k}" / "model.pt", CPU) for k in range(3)]
    single = [Predictor([m], CPU) for m in fold_models]
    loaded = predictor.load([_scan(folds)])
    ensemble = predictor.predict_loaded(loaded, probabilities=True).probabilities
    each = [p.predict_loaded(p.load([_scan(folds)]), probabilities=True).probabilities for p in single]
    np.testing.assert_allclose(ensemble, np.mean(each, axis=0), atol=1e-5)
    assert not np.allclose(each[0], each[1], atol=1e-3), "the folds must differ, or the mean proves nothing"
    # Each fold keeps the settings it was validated with.
    assert [m.settings.mirror for m in predictor.models] == [m.settings.mirror for m in fold_models]


def test_predict_evaluate_and_pyfunc_use_the_ensemble_like_any_model(server_env: dict) -> None:
    folds = server_env
    version = _ensemble_versions()[0].version
    out = folds["root"] / "predicted"
    done = run_main("predict", "--model", f"models:/{MODEL}/{version}", str(_scan(folds, 1)), "--out", str(out),
                    "--work-dir", str(folds["work"]))
    assert done.returncode == 0, done.stderr[-2000:]
    mask = np.asarray(nib.load(out / _scan(folds, 1).name).dataobj)
    record = json.loads((out / _scan(folds, 1).name.replace(".nii.gz", ".json")).read_text())
    assert record["model"]["version"] == str(version)
    done = run_main("evaluate", "--model", f"models:/{MODEL}/{version}", "--data", str(folds["held_out"]),
                    "--out", str(folds["root"] / "evaluated"), "--work-dir", str(folds["work"]))
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((folds["root"] / "evaluated" / "summary.json").read_text())
    tags = mlflow.MlflowClient().get_model_version(MODEL, version).tags
    assert f"{summary['mean_dice']:.4f}" == tags["eval.mean_dice"] == tags["gate.candidate_mean_dice"]
    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL}/{version}")
    labels = pyfunc.predict({"path": [str(_scan(folds, 1))]})
    np.testing.assert_array_equal(labels, mask)


def test_a_missing_or_foreign_fold_is_refused_with_what_to_run(folds: dict, tmp_path: Path) -> None:
    other = tmp_path / "work"
    (other / "state").mkdir(parents=True)
    for k in (0, 1):
        shutil.copy(folds["work"] / "state" / f"fold_{k}.json", other / "state")
    done = run_main("ensemble", str(folds["config"]), "--work-dir", str(other))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    start_up, _, error = done.stderr.strip().partition("\n")
    assert start_up.startswith("threads: ") and error.count("\n") == 0  # the threads line, then one error line
    assert "fold 2 has not completed" in done.stderr
    assert f"unet-pipeline run {folds['config']} --work-dir {other} --fold 2" in done.stderr
    state = json.loads((folds["work"] / "state" / "fold_2.json").read_text())
    (other / "state" / "fold_2.json").write_text(json.dumps({**state, "status": "running"}))
    done = run_main("ensemble", str(folds["config"]), "--work-dir", str(other))
    assert done.returncode == 2 and "fold 2 has not completed (its last run is 'running')" in done.stderr
    # Folds of another config (here: more epochs) are not this cross-validation's.
    done = run_main("ensemble", str(folds["config"]), "--set", "train.epochs=5", "--work-dir", str(folds["work"]))
    assert done.returncode == 2 and "fold 0 was trained with another configuration" in done.stderr
    (other / "state" / "fold_2.json").write_text(json.dumps({**state, "data_hash": "0" * 64}))
    done = run_main("ensemble", str(folds["config"]), "--work-dir", str(other))
    assert done.returncode == 2 and "trained on different data" in done.stderr
    done = run_main("ensemble", str(folds["config"]), "--fold", "1", "--work-dir", str(folds["work"]))
    assert done.returncode == 2 and "--fold does not apply" in done.stderr
    # A fold job at work: the ensemble does not read a model.pt it may be rewriting.
    from pipeline.scheduling import work_dir_lock

    with work_dir_lock(folds["work"], "run", 2):
        done = run_main("ensemble", str(folds["config"]), "--work-dir", str(folds["work"]))
    assert done.returncode == 3 and "command 'run'" in done.stderr and "Traceback" not in done.stderr


def test_a_corrupt_or_foreign_ensemble_file_errors_cleanly(folds: dict, tmp_path: Path) -> None:
    good = folds["work"] / "checkpoints" / "ensemble" / "model.pt"
    assert len(load_models(good, CPU)) == 3
    with pytest.raises(InputDataError, match="is a fold ensemble"):
        load_checkpoint(good)  # a single-model reader never takes the first fold for the whole
    torn = tmp_path / "torn.pt"
    torn.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    ckpt = torch.load(good, weights_only=True)
    foreign = tmp_path / "foreign.pt"
    save_checkpoint({"kind": "fold_ensemble", "members": [{"weights": 1}]}, foreign)
    misfit = tmp_path / "misfit.pt"
    members = [dict(m) for m in ckpt["members"]]
    members[1]["state_dict"] = {k: v for k, v in list(members[1]["state_dict"].items())[1:]}
    save_checkpoint({**{k: v for k, v in ckpt.items() if k != "format"}, "members": members}, misfit)
    replanned = tmp_path / "replanned.pt"
    members = [dict(m) for m in ckpt["members"]]
    members[2]["plan"] = {**members[2]["plan"], "target_spacing": [2.0, 2.0, 2.0]}
    save_checkpoint({**{k: v for k, v in ckpt.items() if k != "format"}, "members": members}, replanned)
    expected = {torn: "not a readable checkpoint", foreign: "member 0 of the fold ensemble is incomplete",
                misfit: "member 1 of the fold ensemble does not load", replanned: "member 2: its preprocessing plan"}
    for path, message in expected.items():
        done = run_main("predict", "--model", str(path), str(_scan(folds)), "--out", str(tmp_path / "out"),
                        "--work-dir", str(folds["work"]))
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, (path, done.stderr)
    with pytest.raises(PipelineError, match="fold 1: its preprocessing plan differs from fold 0's"):
        save_ensemble([ckpt["members"][0], {**ckpt["members"][1], "plan": {"orientation": "LPS"}}],
                      ["fold 0", "fold 1"], {}, [], tmp_path / "never.pt")
    assert not (tmp_path / "never.pt").exists()


def test_an_ensemble_needs_cases_none_of_its_folds_trained_on(folds: dict) -> None:
    from pipeline import registry
    from pipeline.config import load_config

    cfg = load_config(folds["config"], ["registry.evaluation_set=null"])
    facts = registry.EnsembleData("x", "0", 0, "0", {})
    with pytest.raises(PipelineError, match="registry.evaluation_set"):
        registry.register_ensemble(cfg, folds["work"], [], facts)
    # Folds that ran without one: `ensemble --evaluation-set` gives it (here it gets as far as wanting folds).
    with pytest.raises(PipelineError, match="at least one fold"):
        registry.register_ensemble(cfg, folds["work"], [], facts, evaluation_set=str(folds["held_out"]))


def test_the_comparison_script_scores_every_fold_and_the_ensemble(server_env: dict, tmp_path: Path) -> None:
    folds = server_env
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("ensemble_vs_fold", REPO / "scripts" / "ensemble_vs_fold.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    train, held_out = script.split(folds["held_out"].parent, 1, 0, tmp_path / "split")
    kept = [json.loads(p.read_text())["training"] for p in (train, held_out)]
    assert len(kept[0]) == 2 and len(kept[1]) == 1 and not {e["image"] for e in kept[0]} & {e["image"] for e in kept[1]}
    rows = script.measure(folds["work"], folds["held_out"], None, "cpu", tmp_path / "out")
    assert [r["model"] for r in rows] == ["fold 0", "fold 1", "fold 2", "ensemble"]
    assert [r["folds"] for r in rows] == [1, 1, 1, 3]
    tags = mlflow.MlflowClient().search_model_versions(f"name='{MODEL}' and run_id='{folds['runs'][1]}'")[0].tags
    assert f"{rows[1]['mean_dice']:.4f}" == tags["gate.candidate_mean_dice"]  # fold 1 on the same fixed set
    assert all(r["seconds_per_case"] > 0 for r in rows)
    text = script.table(rows)
    assert "| mean of the folds |" in text and "| ensemble |" in text
