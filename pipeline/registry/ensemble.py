"""A fold ensemble registered as one model version, in an MLflow run of its own.

Once every fold of one cross-validation has completed (checked by the caller from the
run states), the folds' exported models (``checkpoints/fold_K/model.pt``) go into one
file (:func:`pipeline.inference.save_ensemble`) that everything taking one checkpoint
loads as all its folds. Its settings:

* each fold keeps the mirroring, overlap and blending it was validated with;
* keep-largest-component is what most folds decided on their own validation fold, so the
  gate's cases play no part in it;
* the quality estimate is calibrated on the ensemble's own predictions of
  ``registry.evaluation_set``: averaged probabilities are smoother than one fold's, so no
  fold's calibration fits them.

An ensemble has no validation fold of its own (every case trained some fold), so it is
scored, and gated against the champion, on ``registry.evaluation_set``: labelled cases none
of the folds trained on. Without one it refuses. The version's description and tags carry
every fold's provenance (fold, run id, version, validation Dice).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.registry.registration import SELECTION_METRIC, Promotion


@dataclass(frozen=True)
class FoldModel:
    """One completed fold, as the run state and the work directory know it.

    Args:
        fold: the fold.
        run_id: its MLflow run.
        model_path: its exported ``model.pt`` (local; never logged).
    """

    fold: int
    run_id: str
    model_path: Path


@dataclass(frozen=True)
class EnsembleData:
    """What the folds were trained on and with, for the ensemble's provenance.

    Args:
        dataset_name: the ``dataset.json`` name.
        data_hash: its content hash (one for all folds).
        num_cases: its labelled cases.
        cv_config_hash: hash of the configuration without the fold.
        code: the code building the ensemble (``{"package", "git_commit", "git_dirty"}``).
        folds_split: the stored cross-validation split (case ids; pseudonymised when logged).
        cv_id: the cross-validation id the fold runs are tagged with (``cv.id``).
    """

    dataset_name: str
    data_hash: str
    num_cases: int
    cv_config_hash: str
    code: Mapping[str, Any]
    folds_split: list[dict[str, list[str]]] = field(default_factory=list)
    cv_id: str = ""


@dataclass
class EnsembleSummary:
    """What ``ensemble`` reports at the end.

    Args:
        run_id: the ensemble's MLflow run (the earlier one's, when up to date).
        tracking_uri: where it was logged.
        model_name: registered model name.
        version: the ensemble's version.
        folds: per fold: ``fold``, ``run_id``, ``version``, ``val_mean_dice``.
        evaluation: its evaluation summary on the evaluation set (empty when up to date).
        promotion: the gate's outcome.
        checkpoint: the ensemble file.
        up_to_date: these very fold runs were registered as an ensemble before: nothing was done.
    """

    run_id: str
    tracking_uri: str
    model_name: str
    version: str | None
    folds: list[dict[str, Any]]
    evaluation: dict[str, Any] = field(default_factory=dict)
    promotion: Promotion | None = None
    checkpoint: Path | None = None
    up_to_date: bool = False


def fold_provenance(model_name: str, folds: Sequence[FoldModel], call: Any) -> list[dict[str, Any]]:
    """Each fold's run id, registered version and validation Dice, read from the tracking server.

    Args:
        model_name: the registered model the folds registered into.
        folds: the completed folds.
        call: runs one registry call, waiting out an outage (``RunLogger.call`` or ``when_reachable``).

    Raises:
        PipelineError: a fold's run is not in the store, or registered no version.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.registry.registration import version_of_run

    client = mlflow.MlflowClient()
    out = []
    for f in folds:
        try:
            run = call(lambda run_id=f.run_id: client.get_run(run_id), f"reading fold {f.fold}'s run")
        except MlflowException:
            raise PipelineError(f"fold {f.fold}'s run {f.run_id} is not in this tracking store: build the ensemble "
                                "against the server the folds logged to (mlflow.tracking_uri)") from None
        version = call(lambda run_id=f.run_id: version_of_run(model_name, run_id), f"finding fold {f.fold}'s version")
        if version is None:
            raise PipelineError(f"fold {f.fold}'s run {f.run_id} registered no version of '{model_name}': register "
                                f"it with `unet-pipeline run CONFIG --fold {f.fold} --force`")
        dice = run.data.metrics.get(SELECTION_METRIC, math.nan)
        out.append({"fold": f.fold, "run_id": f.run_id, "version": version, "val_mean_dice": float(dice)})
    return out


def vote_postprocessing(decisions: Sequence[Mapping[str, Any] | None]) -> dict[str, Any]:
    """Keep-largest-component for the average: each removal that more than half of the folds chose.

    Args:
        decisions: each fold's stored ``postprocessing`` (``{"foreground", "labels"}``).
    """
    decided = [d or {} for d in decisions]
    half = len(decided) / 2
    foreground = sum(bool(d.get("foreground")) for d in decided) > half
    counts: dict[int, int] = {}
    for d in decided:
        for value in d.get("labels", []):
            counts[int(value)] = counts.get(int(value), 0) + 1
    return {"foreground": foreground, "labels": sorted(v for v, n in counts.items() if n > half)}


def already_registered(model_name: str, fold_runs: str, call: Any) -> tuple[str, str] | None:
    """The version (and its run) that registered exactly these fold runs as an ensemble before, if any.

    Args:
        model_name: registered model name.
        fold_runs: the fold run ids, comma-joined in fold order (the ``ensemble.fold_runs`` tag).
        call: runs one registry call.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        found = call(lambda: mlflow.MlflowClient().search_model_versions(f"name='{model_name}'"), "finding ensembles")
    except MlflowException:
        return None
    same = [v for v in found if (v.tags or {}).get("ensemble.fold_runs") == fold_runs]
    if not same:
        return None
    latest = max(same, key=lambda v: int(v.version))
    return str(latest.version), str(latest.run_id)


def build_ensemble_file(folds: Sequence[FoldModel], provenance: Sequence[Mapping[str, Any]], path: Path,
                        quality: Mapping[str, Any] | None = None) -> Path:
    """Write the ensemble file from the folds' exported models.

    Args:
        folds: the completed folds.
        provenance: from :func:`fold_provenance` (stored in the file).
        path: the target file.
        quality: the calibration fitted with the ensemble (``None``: not yet).
    """
    from pipeline.inference import load_checkpoint, save_ensemble

    members = [load_checkpoint(f.model_path) for f in folds]
    votes = vote_postprocessing([(m.get("inference") or {}).get("postprocessing") for m in members])
    shared: dict[str, Any] = {"postprocessing": votes, **({"quality": dict(quality)} if quality else {})}
    return save_ensemble(members, [f"fold {f.fold}" for f in folds], shared, provenance, path)


def _evaluate(cfg: PipelineConfig, path: Path, cases: Sequence[Any], out_dir: Path, device: Any) -> Any:
    """The ensemble on the evaluation set, its quality calibration fitted there."""
    from pipeline.evaluation import evaluate_cases
    from pipeline.inference import Predictor, load_models

    predictor = Predictor(load_models(path, device), device)
    return evaluate_cases(predictor, cases, out_dir, surface_tolerance_mm=cfg.evaluate.surface_tolerance_mm,
                          qc=cfg.evaluate.qc_images, calibrate=True, min_expected_dice=cfg.qc.min_expected_dice,
                          flag_quantile=cfg.qc.flag_quantile, model={"name": cfg.mlflow.model_name, "version": "ensemble"})


def _open_run(cfg: PipelineConfig, work_dir: Path, uri: str, data: EnsembleData, provenance: list[dict[str, Any]]) -> Any:
    """The ensemble's own MLflow run, with its params (no paths), redacted config and pseudonymised split."""
    import mlflow

    from pipeline.registry.privacy import dataset_label, holdout_label, redact_config
    from pipeline.registry.tracking import RunLogger, when_reachable

    tags = {"model.kind": "fold_ensemble", "ensemble.folds": ",".join(str(p["fold"]) for p in provenance),
            "ensemble.fold_runs": ",".join(p["run_id"] for p in provenance),
            "ensemble.config_sha256_without_fold": data.cv_config_hash, "cv.id": data.cv_id}
    run = when_reachable(lambda: mlflow.start_run(tags=tags), uri, cfg.mlflow.outage_wait_minutes,
                         "starting the MLflow run")
    log = RunLogger(uri, work_dir, run.info.run_id, cfg.mlflow.outage_wait_minutes)
    label = dataset_label(data.dataset_name, data.data_hash)
    params = {k: v for k, v in cfg.flat().items() if k not in ("data.dataset", "registry.evaluation_set", "data.fold")}
    params["data.holdout"] = holdout_label(params.get("data.holdout"))
    params.update({"data.dataset": label, "registry.evaluation_set": "fixed", "data.num_cases": data.num_cases,
                   "ensemble.num_folds": len(provenance)})
    config = redact_config(cfg.to_dict(), label)
    config["data"].pop("fold", None)
    log.start(params, config, {}, data.folds_split)
    return log


def register_ensemble(cfg: PipelineConfig, work_dir: Path, folds: Sequence[FoldModel], data: EnsembleData,
                      force: bool = False, evaluation_set: str | None = None) -> EnsembleSummary:
    """Build, score, gate and register the fold ensemble as one version of ``mlflow.model_name``.

    Args:
        cfg: the configuration the folds ran with.
        work_dir: the work directory (the ensemble file goes to ``checkpoints/ensemble/model.pt``, its
            evaluation to ``evaluation/ensemble``).
        folds: every fold of the cross-validation, completed.
        data: the data and code facts for the provenance.
        force: register again even when these fold runs were registered as an ensemble before.
        evaluation_set: the fixed evaluation set, when the folds ran without ``registry.evaluation_set``
            (``None``: the config's).

    Raises:
        PipelineError: no ``registry.evaluation_set``, a fold's run or version missing, the folds' plans differ.
    """
    from pipeline.data import load_dataset
    from pipeline.registry.registration import setup, tracking_uri
    from pipeline.registry.tracking import connect, when_reachable

    if evaluation_set is not None:
        cfg = dataclasses.replace(cfg, registry=dataclasses.replace(cfg.registry, evaluation_set=evaluation_set))
    if cfg.registry.evaluation_set is None:
        raise PipelineError("an ensemble has no validation fold of its own (every case trained some fold): set "
                            "registry.evaluation_set (or give --evaluation-set) to labelled cases none of the folds "
                            "trained on")
    uri = tracking_uri(cfg.mlflow.tracking_uri, work_dir)
    connect(uri, work_dir)
    setup(cfg.mlflow.tracking_uri, work_dir, cfg.mlflow.experiment)
    name = cfg.mlflow.model_name

    def call(action: Any, what: str) -> Any:
        return when_reachable(action, uri, cfg.mlflow.outage_wait_minutes, what)

    provenance = fold_provenance(name, folds, call)
    fold_runs = ",".join(p["run_id"] for p in provenance)
    earlier = None if force else already_registered(name, fold_runs, call)
    if earlier is not None:
        return EnsembleSummary(earlier[1], uri, name, earlier[0], provenance, up_to_date=True)
    path = work_dir / "checkpoints" / "ensemble" / "model.pt"
    build_ensemble_file(folds, provenance, path)
    cases = list(load_dataset(cfg.registry.evaluation_set).cases)
    log = _open_run(cfg, work_dir, uri, data, provenance)
    try:
        summary = _score_and_register(cfg, work_dir, folds, data, provenance, path, cases, log)
    except BaseException:
        try:
            log.end("FAILED")
        except Exception:  # the run's status is secondary to the error being reported
            pass
        raise
    log.end("FINISHED")
    return summary


def _score_and_register(cfg: PipelineConfig, work_dir: Path, folds: Sequence[FoldModel], data: EnsembleData,
                        provenance: list[dict[str, Any]], path: Path, cases: list[Any], log: Any) -> EnsembleSummary:
    """Evaluate and calibrate on the evaluation set, then gate, register and describe holding the gate lease."""
    from pipeline.inference import compile_ahead_of_time, load_checkpoint
    from pipeline.registry.gate import gated_registration, score_and_log
    from pipeline.registry.gate import tags as gate_tags
    from pipeline.registry.lease import GateLease
    from pipeline.registry.provenance import EnsembleProvenance, describe_ensemble
    from pipeline.registry.registration import log_model
    from pipeline.registry.tracking import metric_name
    from pipeline.training import resolve_device

    device = resolve_device(cfg.train.device)
    name = cfg.mlflow.model_name
    evaluation = _evaluate(cfg, path, cases, work_dir / "evaluation" / "ensemble", device)
    calibration = evaluation.calibration
    quality = calibration.to_dict() if calibration is not None and calibration.labels else None
    build_ensemble_file(folds, provenance, path, quality)
    summary = evaluation.summary
    labels = list(summary["dice_per_label"])
    log.metrics({"eval_mean_dice": summary["mean_dice"],
                 **{f"eval_dice_{metric_name(k)}": v for k, v in summary["dice_per_label"].items()},
                 **{f"fold_{p['fold']}_val_mean_dice": p["val_mean_dice"] for p in provenance
                    if not math.isnan(p["val_mean_dice"])}}, "logging the evaluation")
    log.evaluation(evaluation, labels)
    members = [load_checkpoint(f.model_path) for f in folds]
    settings = [m.get("inference") or {} for m in members]
    inference = {"mirror": "/".join(str(s.get("mirror")) for s in settings),
                 "overlap": "/".join(str(s.get("overlap")) for s in settings),
                 "postprocessing": vote_postprocessing([s.get("postprocessing") for s in settings])}

    def gate() -> tuple[Any, str]:
        return score_and_log(cfg.registry.evaluation_set, cfg.registry.promote_margin, name, device, work_dir,
                             cases, evaluation, path, log, evaluated_on_set=True,
                             cache_max_gb=cfg.registry.model_cache_max_gb)

    def register() -> str | None:
        version = log.call(lambda: log_model(path, name), "registering the ensemble")
        if version is not None and cfg.registry.compile_ahead_of_time:
            compile_ahead_of_time(path, cache_max_gb=cfg.registry.compiled_cache_max_gb)
        return version

    def describe(version: str, result: Any, eval_set: str) -> None:
        facts = EnsembleProvenance(name, version, log.run_id, data.dataset_name, data.data_hash, data.num_cases,
                                   cfg.data.num_folds, cfg.data.split_seed, data.cv_config_hash, data.code,
                                   members[0]["plan"], provenance, eval_set, summary, inference, result.decision)
        describe_ensemble(facts, {**gate_tags(result, eval_set), "cv.id": data.cv_id}, log)

    lease = GateLease(name, cfg.registry.gate_lease_s, cfg.registry.gate_wait_s, call=log.call)
    _, _, promotion = gated_registration(name, lease, gate, register, describe, log.call)
    version = promotion.version if promotion is not None else None
    return EnsembleSummary(log.run_id, log.uri, name, version, provenance, summary, promotion, path)
