"""The training stages: train a fold, evaluate it, gate and register it; register a fold ensemble."""

from __future__ import annotations

import json
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import registry
from pipeline.config import PipelineConfig
from pipeline.scheduling import RunSession
from pipeline.stages.data import Prepared, checkpoint_dir, discover, prepare_distributed
from pipeline.training import resolve_device


@dataclass
class RunSummary:
    """What ``run`` reports at the end.

    Args:
        run_id: the MLflow run.
        tracking_uri: where it was logged.
        evaluation: the evaluation summary (``mean_dice``, ``dice_per_label``...).
        model_name: registered model name.
        promotion: the registry outcome.
        epochs: epochs trained.
        checkpoint: the registered checkpoint's path.
        up_to_date: nothing was done: data, config and code are unchanged since the last completed run.
        finished: when that run completed.
    """

    run_id: str
    tracking_uri: str
    evaluation: dict[str, Any] = field(default_factory=dict)
    model_name: str | None = None
    promotion: registry.Promotion | None = None
    epochs: int = 0
    checkpoint: Path | None = None
    up_to_date: bool = False
    finished: str | None = None


def _run_record(cfg: PipelineConfig, work_dir: Path, prepared: Prepared, world_size: int):
    """What a new or reopened MLflow run logs first: params without paths, the redacted config, the plan, the split, tags."""
    from pipeline.registry import dataset_label, redact_config, run_params

    counts = {"num_cases": len(prepared.cases), "num_train": len(prepared.split["train"]),
              "num_val": len(prepared.split["val"])}
    params = run_params(cfg.flat(), prepared.dataset.name, prepared.data_hash, cfg.registry.evaluation_set is not None,
                        counts, prepared.plan["network"], world_size)
    config = redact_config(cfg.to_dict(), dataset_label(prepared.dataset.name, prepared.data_hash))
    folds = json.loads((work_dir / "splits.json").read_text())["folds"]
    tags = {"preprocess.cases_preprocessed": str(prepared.preprocessed)}  # by this call; 0: another fold's job did
    artifacts = {"preprocess": prepared.out_dir / "plans.json"}
    if (prepared.dataset.root / "manifest.json").is_file():  # a DICOM dataset: which label object made each case
        artifacts["dataset"] = prepared.dataset.root / "manifest.json"
    return params, config, artifacts, folds, tags


def _labels(cfg: PipelineConfig, prepared: Prepared) -> dict[str, Any] | None:
    """A DICOM dataset's label set (counts, source without credentials or path, digest); ``None`` for NIfTI data."""
    from pipeline.data import label_summary
    from pipeline.dicomweb import redact_url

    manifest = prepared.dataset.root / "manifest.json"
    if cfg.data.dataset is None or not manifest.is_file():
        return None
    source = redact_url(cfg.data.dataset) if "://" in cfg.data.dataset else "a DICOM folder"
    return label_summary(json.loads(manifest.read_text()), source)


def _lock(work_dir: Path, command: str, is_main: bool, fold: int):
    """The fold's lock (``work_dir/locks/fold_K.lock``) on rank 0 (``torchrun``'s other processes follow rank 0)."""
    from contextlib import nullcontext

    from pipeline.scheduling import work_dir_lock

    return work_dir_lock(work_dir, command, fold) if is_main else nullcontext()


def _train(cfg: PipelineConfig, work_dir: Path, prepared: Prepared, resume: bool, session: RunSession,
           run_id: str | None):
    """Train this fold; on rank 0 per-epoch metrics go to the run through the on-disk outbox."""
    from pipeline.training import train

    folder = checkpoint_dir(work_dir, cfg.data.fold)
    history = folder / "history.jsonl"
    if not resume:
        history.unlink(missing_ok=True)
    log = session.log  # None off rank 0: only rank 0 logs
    result = train(cfg, prepared.plan, prepared.subset("train"), prepared.subset("val"), folder,
                   log_metrics=log.epoch_metrics(history) if log else None, resume=resume,
                   extra_state={"mlflow_run_id": run_id})
    if log:
        log.metrics({"best_val_dice": result.best_val_dice, "epochs_completed": result.epochs,
                     "train_seconds": result.train_seconds, "patches_per_second": result.patches_per_second},
                    "logging the training summary")
        log.tags({"train.stopped_by_time_budget": str(result.stopped_by_budget), "train.precision": result.precision,
                  "ddp.param_checksums": json.dumps(result.param_checksums),
                  "train.skipped_steps": str(result.skipped_steps),
                  **({"train.precision_fell_back": "bfloat16 -> float32"} if result.fell_back_to_float32 else {})})
        log.curves(history, prepared.plan["labels"])
        _against_peak(cfg, prepared, result, log)
    return result


def _against_peak(cfg: PipelineConfig, prepared: Prepared, result: Any, log: Any) -> None:
    """The run's training GFLOP/s against the CPU's peak for its precision: two metrics, a tag and one line.

    Only for one process on a CPU: the peak rules know CPUs, and a DDP run's patches are summed over its hosts.
    """
    import sys

    import torch

    from models.unet import UNet
    from pipeline.benchmarking import achieved_line, cpu_peak, training_step_flops
    from pipeline.inference import load_checkpoint

    if (resolve_device(cfg.train.device).type != "cpu" or result.precision not in ("float32", "bfloat16")
            or not result.patches_per_second or torch.distributed.is_initialized()):
        return
    net = prepared.plan["network"]
    batch = int(net["batch_size"])
    # The network as it trained (deep supervision included), rebuilt from the final checkpoint on the meta device.
    network = UNet(**load_checkpoint(result.final_checkpoint)["model"])
    step = training_step_flops(network, None, (batch, len(prepared.plan["modalities"]), *net["patch_size"]))
    peak = cpu_peak(result.precision, torch.get_num_threads())
    line = achieved_line("training", step, batch / result.patches_per_second, peak)
    achieved = step / batch * result.patches_per_second / 1e9
    log.metrics({"gflops_per_second": achieved, **({"ratio_to_peak": peak.ratio(achieved)} if peak.gflops else {})},
                "logging the training's GFLOP/s")
    log.tags({"train.peak": peak.how})
    print(f"{line}; {peak.how}", file=sys.stderr)


def _training_result_from_disk(cfg: PipelineConfig, work_dir: Path):
    """A finished training's checkpoints (the ``finish`` action: training done, the rest not yet)."""
    from pipeline.inference import load_checkpoint
    from pipeline.training import TrainResult

    folder = checkpoint_dir(work_dir, cfg.data.fold)
    final = folder / "final.pt"
    epochs = int(load_checkpoint(final).get("epoch") or 0)
    return TrainResult(folder / "best.pt", folder / "last.pt", final, float("nan"), epochs, False)


def _run_or_train(cfg: PipelineConfig, work_dir: Path, force: bool, register: bool,
                  fail_if_not_promoted: bool = False) -> RunSummary | None:
    from pipeline.errors import NotPromotedError, TrainingFailedError
    from pipeline.training import distributed

    session = RunSession(work_dir, cfg.data.fold, cfg.mlflow.tracking_uri, cfg.mlflow.experiment,
                         cfg.mlflow.outage_wait_minutes, force)
    env = distributed.init(resolve_device(cfg.train.device).type)
    with _lock(work_dir, "run" if register else "train", env.is_main, cfg.data.fold):
        if env.is_main:
            session.connect()
        prepared = prepare_distributed(cfg, work_dir)
        decision = None
        if env.is_main:
            decision = session.decide(cfg.to_dict(), prepared.data_hash,
                                      checkpoint_dir(work_dir, cfg.data.fold) / "last.pt")
        action = distributed.broadcast(decision[0] if decision else None)
        if action == "up_to_date":
            distributed.shutdown()
            if not env.is_main:
                return None
            _, _, state = decision
            return RunSummary(state.run_id or "", session.uri or "", up_to_date=True, model_name=cfg.mlflow.model_name,
                              finished=state.finished)
        run_id = None
        if env.is_main:
            _, _, state = decision
            run_id = session.open_run(action, state, *_run_record(cfg, work_dir, prepared, env.world_size))
            labels = _labels(cfg, prepared)
            if labels:
                session.log.dataset_input(labels)
        try:
            if action == "finish":
                result = _training_result_from_disk(cfg, work_dir)
            else:
                result = _train(cfg, work_dir, prepared, action == "resume", session, run_id)
        except TrainingFailedError:
            if env.is_main:
                session.mark("failed", run_id)
                with suppress(Exception):
                    session.log.end("FAILED")
            raise
        distributed.shutdown()
        if not env.is_main:
            return None
        session.mark("trained", run_id)
        summary = _finish(cfg, work_dir, prepared, result, session, run_id, register)
        session.log.flush()
        session.log.end("FINISHED")
        session.mark("completed", run_id)
    if fail_if_not_promoted and summary.promotion is not None and not summary.promotion.promoted:
        raise NotPromotedError(f"version {summary.promotion.version} was registered but not promoted: "
                               f"{summary.promotion.decision}")
    return summary


def _finish(cfg: PipelineConfig, work_dir: Path, prepared: Prepared, result: Any, session: RunSession, run_id: str,
            register: bool) -> RunSummary:
    """After training: evaluate and export, then (``run``) gate, register, describe."""
    chosen = result.final_checkpoint if cfg.evaluate.checkpoint == "final" else result.best_checkpoint
    log = session.log
    if not register:
        log.call(lambda: registry.log_model(chosen), "logging the model")
        return RunSummary(run_id, session.uri or "", epochs=result.epochs, checkpoint=chosen)
    log.tags({"evaluate.checkpoint": cfg.evaluate.checkpoint})
    from pipeline.evaluation import validate_and_export
    from pipeline.inference import InferenceSettings, compile_ahead_of_time
    from pipeline.registry import Provenance, describe_version, gate_tags, metric_name, score_and_log

    device = resolve_device(cfg.train.device)
    e = cfg.evaluate
    settings = InferenceSettings.from_config(cfg)
    evaluation, model_path, inference = validate_and_export(
        settings, device, prepared.plan, prepared.raw_cases("val"), chosen, work_dir / "evaluation" / f"fold_{cfg.data.fold}",
        decide_postprocessing=e.postprocess, surface_tolerance_mm=e.surface_tolerance_mm, qc=e.qc_images,
        min_expected_dice=cfg.qc.min_expected_dice, flag_quantile=cfg.qc.flag_quantile, estimator=cfg.qc.estimator)
    summary = evaluation.summary
    names = list(summary["dice_per_label"])
    log.metrics({registry.SELECTION_METRIC: summary["mean_dice"],
                 **{f"val_dice_{metric_name(k)}": v for k, v in summary["dice_per_label"].items()},
                 **{f"val_hd95_{metric_name(k)}": v for k, v in summary["hd95_per_label"].items()},
                 **{f"val_surface_dice_{metric_name(k)}": v for k, v in summary["surface_dice_per_label"].items()},
                 "val_mean_dice_without_postprocessing": summary["mean_dice_without_postprocessing"]},
                "logging the evaluation")
    log.evaluation(evaluation, names)
    if evaluation.calibration is not None and evaluation.calibration.labels:
        v = evaluation.calibration.validation
        log.metrics({"quality_spearman": v["spearman"], "quality_spearman_loo": v["spearman_loo"],
                     # Out of sample: what the estimate is worth on unseen cases (see Calibration.reliable).
                     **{f"quality_{k}": v[k] for k in ("spearman_oos", "worst5_caught", "flagged_share", "reliable")
                        if k in v},
                     "quality_min_expected_dice": evaluation.calibration.min_expected_dice,
                     "quality_flagged_fraction": sum(r["flagged"] for r in evaluation.records) / max(1, len(evaluation.records))},
                    "logging the quality calibration")
    def gate() -> tuple[Any, str]:
        return score_and_log(cfg.registry.evaluation_set, cfg.registry.promote_margin, cfg.mlflow.model_name, device,
                             work_dir, prepared.raw_cases("val"), evaluation, model_path, log,
                             cache_max_gb=cfg.registry.model_cache_max_gb)

    def register() -> str | None:
        version = log.call(lambda: registry.log_model(model_path, cfg.mlflow.model_name), "registering the model")
        if version is not None and cfg.registry.compile_ahead_of_time:
            compile_ahead_of_time(model_path, cache_max_gb=cfg.registry.compiled_cache_max_gb)
        return version

    def describe(version: str, gate_result: Any, eval_set: str) -> None:
        keys = session.keys
        facts = Provenance(
            cfg.mlflow.model_name, version, run_id, prepared.dataset.name, prepared.data_hash, len(prepared.cases),
            cfg.data.fold, cfg.data.num_folds, cfg.data.split_seed, len(prepared.split["train"]),
            len(prepared.split["val"]), keys.config_hash, keys.code, prepared.plan, summary, inference,
            gate_result.decision, _labels(cfg, prepared))
        describe_version(facts, gate_tags(gate_result, eval_set), log)

    lease = registry.GateLease(cfg.mlflow.model_name, cfg.registry.gate_lease_s, cfg.registry.gate_wait_s, call=log.call)
    _, _, promotion = registry.gated_registration(cfg.mlflow.model_name, lease, gate, register, describe, log.call)
    return RunSummary(run_id, session.uri or "", summary, cfg.mlflow.model_name, promotion, result.epochs, model_path)


def train_stage(cfg: PipelineConfig, work_dir: Path, force: bool = False) -> RunSummary | None:
    """Preprocess and train one fold in one MLflow run, logging the model (unregistered).

    Same scheduling rules as :func:`run_stage` (lock, automatic resume, skip when up to date).
    Under ``torchrun`` every process trains; only rank 0 logs, and only it returns a summary.

    Args:
        cfg: the pipeline configuration.
        work_dir: the work directory.
        force: retrain even when data, config and code are unchanged.
    """
    return _run_or_train(cfg, work_dir, force, register=False)


def run_stage(cfg: PipelineConfig, work_dir: Path, force: bool = False,
              fail_if_not_promoted: bool = False) -> RunSummary | None:
    """The whole job, safe to call from a scheduler: preprocess -> train -> evaluate -> gate -> register.

    Takes the work directory's lock (exit 3 when another call holds it); checks the
    tracking server before any work (exit 5); resumes an interrupted run in the same
    MLflow run; skips everything when data, config and code are unchanged since the
    last completed run (``force`` retrains); a NaN loss ends with exit 4.

    Args:
        cfg: the pipeline configuration.
        work_dir: the work directory.
        force: retrain even when data, config and code are unchanged.
        fail_if_not_promoted: raise :class:`~pipeline.errors.NotPromotedError` (exit 6) when the
            new version does not take ``champion``.
    """
    return _run_or_train(cfg, work_dir, force, register=True, fail_if_not_promoted=fail_if_not_promoted)


def ensemble_stage(cfg: PipelineConfig, work_dir: Path, force: bool = False, fail_if_not_promoted: bool = False,
                   config_label: str = "CONFIG", evaluation_set: str | None = None) -> registry.EnsembleSummary:
    """Register every fold of one cross-validation as one model version (a fold ensemble), gated like a run.

    Args:
        cfg: the configuration the folds ran with (any ``data.fold``).
        work_dir: the work directory the folds ran in (their states and ``checkpoints/fold_K/model.pt``).
        force: register again even when these fold runs were registered as an ensemble before.
        fail_if_not_promoted: raise :class:`~pipeline.errors.NotPromotedError` (exit 6) when it does not take ``champion``.
        config_label: how messages name the config (what to run for a missing fold).
        evaluation_set: where it is scored and gated, when the folds ran without ``registry.evaluation_set``.
    """
    from pipeline.errors import NotPromotedError
    from pipeline.scheduling import code_version, cv_config_hash, cv_id, locked_folds

    with locked_folds(work_dir, cfg.to_dict(), config_label) as states:  # no fold job rewrites a model.pt meanwhile
        dataset = discover(cfg, work_dir)
        splits = work_dir / "splits.json"
        facts = registry.EnsembleData(
            dataset.name, states[0].data_hash, len(dataset.cases), cv_config_hash(cfg.to_dict()), code_version(),
            json.loads(splits.read_text())["folds"] if splits.is_file() else [], cv_id(cfg.to_dict(), states[0].data_hash))
        folds = [registry.FoldModel(s.fold, s.run_id or "", checkpoint_dir(work_dir, s.fold) / "model.pt") for s in states]
        summary = registry.register_ensemble(cfg, work_dir, folds, facts, force, evaluation_set)
    if fail_if_not_promoted and summary.promotion is not None and not summary.promotion.promoted:
        raise NotPromotedError(f"version {summary.promotion.version} was registered but not promoted: "
                               f"{summary.promotion.decision}")
    return summary
