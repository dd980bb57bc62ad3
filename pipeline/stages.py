"""The stages wired together: config -> data -> preprocess -> train -> evaluate -> registry."""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline import registry
from pipeline.config import PipelineConfig
from pipeline.dataset import Case, Dataset, load_dataset
from pipeline.demo_data import make_demo_dataset
from pipeline.devices import resolve_device
from pipeline.errors import InputDataError, PipelineError
from pipeline.preprocess import PreprocessedCase, preprocess_dataset
from pipeline.splits import stored_splits


@dataclass
class Prepared:
    """The dataset, its plan, preprocessed cases and the train/validation split.

    Args:
        dataset: the discovered dataset.
        plan: the preprocessing plan.
        cases: preprocessed cases by id.
        split: this fold's ``{"train": [...ids], "val": [...ids]}``.
        out_dir: the preprocessed folder.
    """

    dataset: Dataset
    plan: dict[str, Any]
    cases: dict[str, PreprocessedCase]
    split: dict[str, list[str]]
    out_dir: Path

    def subset(self, part: str) -> list[PreprocessedCase]:
        """Preprocessed cases of ``"train"`` or ``"val"``."""
        return [self.cases[i] for i in self.split[part]]

    def raw_cases(self, part: str) -> list[Case]:
        """Original (unpreprocessed) cases of ``"train"`` or ``"val"``."""
        by_id = {c.case_id: c for c in self.dataset.cases}
        return [by_id[i] for i in self.split[part]]


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
        checkpoint: the best checkpoint's path.
    """

    run_id: str
    tracking_uri: str
    evaluation: dict[str, Any] = field(default_factory=dict)
    model_name: str | None = None
    promotion: registry.Promotion | None = None
    epochs: int = 0
    checkpoint: Path | None = None


def discover(cfg: PipelineConfig, work_dir: Path) -> Dataset:
    """The configured dataset, generating the synthetic demo data first when asked.

    Args:
        cfg: the pipeline configuration.
        work_dir: the work directory (demo data goes to ``work_dir/demo_data``).
    """
    if cfg.data.dataset is None:
        path = make_demo_dataset(
            work_dir / "demo_data", cfg.data.synthetic_cases, cfg.data.synthetic_size, cfg.data.split_seed
        )
        return load_dataset(path)
    return load_dataset(cfg.data.dataset)


def prepare(cfg: PipelineConfig, work_dir: Path) -> Prepared:
    """The preprocess stage: discover, fingerprint, plan, preprocess (cached) and the k-fold split.

    Args:
        cfg: the pipeline configuration.
        work_dir: the work directory.
    """
    dataset = discover(cfg, work_dir)
    out_dir = work_dir / "preprocessed"
    plan, cases = preprocess_dataset(cfg, dataset, out_dir)
    folds = stored_splits([c.case_id for c in cases], cfg.data.num_folds, cfg.data.split_seed, work_dir / "splits.json")
    return Prepared(dataset, plan, {c.case_id: c for c in cases}, folds[cfg.data.fold], out_dir)


def prepare_distributed(cfg: PipelineConfig, work_dir: Path) -> Prepared:
    """:func:`prepare` on rank 0 first; the other ``torchrun`` processes then read its cache.

    Args:
        cfg: the pipeline configuration.
        work_dir: the work directory.
    """
    from pipeline import distributed

    env = distributed.init(resolve_device(cfg.train.device).type)
    if env.is_main:
        prepared = prepare(cfg, work_dir)
    distributed.barrier()
    if not env.is_main:
        prepared = prepare(cfg, work_dir)
    return prepared


def checkpoint_dir(work_dir: Path, fold: int) -> Path:
    """Where a fold's ``best.pt`` and ``last.pt`` live.

    Args:
        work_dir: the work directory.
        fold: the cross-validation fold.
    """
    return work_dir / "checkpoints" / f"fold_{fold}"


def _resumable_run_id(cfg: PipelineConfig, work_dir: Path, resume: bool) -> str | None:
    """The MLflow run of an interrupted training, when resuming and its ``last.pt`` names one."""
    from pipeline.checkpoints import load_checkpoint

    last = checkpoint_dir(work_dir, cfg.data.fold) / "last.pt"
    if not resume or not last.is_file():
        return None
    return load_checkpoint(last).get("mlflow_run_id")


def _train(cfg: PipelineConfig, work_dir: Path, prepared: Prepared, resume: bool, run_id: str | None):
    """Train this fold; on rank 0 log params, plans and per-epoch metrics to the active MLflow run."""
    from pipeline import distributed
    from pipeline.training import train

    env = distributed.current()
    log = None
    if env.is_main:
        import mlflow

        params = {**cfg.flat(), "data.num_cases": len(prepared.cases), "data.num_train": len(prepared.split["train"]),
                  "data.num_val": len(prepared.split["val"]), "ddp.world_size": env.world_size,
                  **{f"plan.{k}": v for k, v in prepared.plan["network"].items()}}
        logged = mlflow.get_run(run_id).data.params if run_id else {}
        mlflow.log_params({k: v for k, v in params.items() if k not in logged})
        if not run_id:
            mlflow.log_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config/resolved.yaml")
            for name in ("plans.json", "fingerprint.json"):
                mlflow.log_artifact(str(prepared.out_dir / name), "preprocess")
            mlflow.log_artifact(str(work_dir / "splits.json"), "preprocess")
        log = lambda metrics, step: mlflow.log_metrics(metrics, step=step)  # noqa: E731
    result = train(
        cfg, prepared.plan, prepared.subset("train"), prepared.subset("val"), checkpoint_dir(work_dir, cfg.data.fold),
        log_metrics=log, resume=resume, extra_state={"mlflow_run_id": run_id or _active_run_id()},
    )
    if env.is_main:
        import mlflow

        mlflow.log_metrics({"best_val_dice": result.best_val_dice, "epochs_completed": result.epochs,
                            "train_seconds": result.train_seconds, "patches_per_second": result.patches_per_second})
        mlflow.set_tags({"train.stopped_by_time_budget": str(result.stopped_by_budget),
                         "ddp.param_checksums": json.dumps(result.param_checksums)})
    return result


def _active_run_id() -> str | None:
    import mlflow

    run = mlflow.active_run()
    return run.info.run_id if run else None


def _start_run(cfg: PipelineConfig, work_dir: Path, resume: bool):
    """Set up MLflow and start (or, when resuming, reopen) the run; ``None`` on ranks other than 0."""
    from contextlib import nullcontext

    from pipeline import distributed

    if not distributed.current().is_main:
        return nullcontext(None), None, None
    import mlflow

    uri = registry.setup(cfg.mlflow.tracking_uri, work_dir, cfg.mlflow.experiment)
    run_id = _resumable_run_id(cfg, work_dir, resume)
    tags = {"data.fold": str(cfg.data.fold)}
    return mlflow.start_run(run_id=run_id, tags=None if run_id else tags), uri, run_id


def train_stage(cfg: PipelineConfig, work_dir: Path, resume: bool = False) -> RunSummary | None:
    """Preprocess and train one fold in one MLflow run, logging the model (unregistered).

    Under ``torchrun`` every process trains; only rank 0 logs, and only it returns a summary.

    Args:
        cfg: the pipeline configuration.
        work_dir: the work directory.
        resume: continue an interrupted training from its ``last.pt`` and MLflow run.
    """
    from pipeline import distributed

    prepared = prepare_distributed(cfg, work_dir)
    context, uri, run_id = _start_run(cfg, work_dir, resume)
    with context as run:
        result = _train(cfg, work_dir, prepared, resume, run_id)
        chosen = result.final_checkpoint if cfg.evaluate.checkpoint == "final" else result.best_checkpoint
        if run is not None:
            registry.log_model(chosen, len(prepared.plan["modalities"]), cfg.model.spatial_dims)
    distributed.shutdown()
    if run is None:
        return None
    return RunSummary(run.info.run_id, uri, epochs=result.epochs, checkpoint=chosen)


def run_stage(cfg: PipelineConfig, work_dir: Path, resume: bool = False) -> RunSummary | None:
    """The whole job: preprocess -> train -> evaluate on the fold's held-out cases -> register.

    Args:
        cfg: the pipeline configuration.
        work_dir: the work directory.
        resume: continue an interrupted run from its ``last.pt`` and MLflow run.
    """
    from pipeline import distributed

    prepared = prepare_distributed(cfg, work_dir)
    context, uri, run_id = _start_run(cfg, work_dir, resume)
    with context as run:
        result = _train(cfg, work_dir, prepared, resume, run_id)
        distributed.shutdown()
        if run is None:
            return None
        import mlflow

        chosen = result.final_checkpoint if cfg.evaluate.checkpoint == "final" else result.best_checkpoint
        mlflow.set_tag("evaluate.checkpoint", cfg.evaluate.checkpoint)
        evaluation, model_path = validate_and_export(cfg, work_dir, prepared, chosen)
        summary = evaluation.summary
        mlflow.log_metric(registry.SELECTION_METRIC, summary["mean_dice"])
        mlflow.log_metrics({f"val_dice_{_metric_name(k)}": v for k, v in summary["dice_per_label"].items()})
        mlflow.log_dict(evaluation.postprocessing.to_dict(), "evaluation/postprocessing.json")
        mlflow.log_artifact(str(work_dir / "evaluation" / "cases.csv"), "evaluation")
        mlflow.log_artifact(str(work_dir / "evaluation" / "summary.json"), "evaluation")
        version = registry.log_model(
            model_path, len(prepared.plan["modalities"]), cfg.model.spatial_dims, cfg.mlflow.model_name
        )
        promotion = registry.promote(cfg.mlflow.model_name, version, summary["mean_dice"]) if version else None
    return RunSummary(run.info.run_id, uri, summary, cfg.mlflow.model_name, promotion, result.epochs, model_path)


def validate_and_export(cfg: PipelineConfig, work_dir: Path, prepared: Prepared, chosen: Path):
    """Evaluate the chosen checkpoint on the held-out cases with the configured settings, decide the
    postprocessing there, and write ``model.pt``: the weights with the settings they were validated with.

    Args:
        cfg: the pipeline configuration.
        work_dir: the work directory (``evaluation/`` and the fold's ``model.pt`` go there).
        prepared: the prepared data (its validation cases are scored).
        chosen: the checkpoint to validate (``final.pt`` or ``best.pt``).

    Returns:
        The :class:`~pipeline.evaluation.EvaluationResult` and the exported model's path.
    """
    import dataclasses

    from pipeline.checkpoints import load_checkpoint, save_checkpoint
    from pipeline.evaluation import evaluate_cases
    from pipeline.inference import InferenceSettings, Predictor, inference_section, load_model

    device = resolve_device(cfg.train.device)
    e = cfg.evaluate
    settings = InferenceSettings(mirror=e.mirror, overlap=e.overlap, mode=e.mode, sw_batch_size=e.sw_batch_size)
    model = load_model(chosen, device)
    model.settings = settings
    evaluation = evaluate_cases(
        Predictor([model], device), prepared.raw_cases("val"), work_dir / "evaluation",
        decide_postprocessing=e.postprocess, surface_tolerance_mm=e.surface_tolerance_mm, qc=e.qc_images,
    )
    validated = dataclasses.replace(settings, postprocessing=evaluation.postprocessing)
    state = load_checkpoint(chosen)
    model_path = chosen.with_name("model.pt")
    save_checkpoint({k: state[k] for k in ("model", "plan", "patch_size", "state_dict")}
                    | {"inference": inference_section(validated, prepared.plan, validated=True),
                       "epoch": state.get("epoch"), "source_checkpoint": chosen.name}, model_path)
    return evaluation, model_path


def _metric_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-/ ]", "_", label).replace(" ", "_")


def _checkpoints_of(ref: str) -> list[str]:
    """A folder reference means every fold's ``best.pt`` under it (a cross-validation ensemble)."""
    path = Path(ref)
    if not path.is_dir():
        return [ref]
    found = sorted(path.glob("fold_*/final.pt")) or sorted(path.glob("final.pt"))
    if not found:
        raise InputDataError(path, "holds no fold_*/final.pt checkpoints to ensemble")
    return [str(p) for p in found]


def load_predictor(model_refs: Sequence[str], work_dir: Path, overrides=None, device_name: str = "auto",
                   series_uid: str | None = None):
    """One predictor averaging every referenced model (all must share one preprocessing plan).

    Args:
        model_refs: model references accepted by :func:`registry.resolve_model`, or folders of
            ``fold_*/final.pt``; several are ensembled (softmax averaged).
        work_dir: work directory (its SQLite store is the default registry).
        overrides: :class:`~pipeline.inference.Overrides` of the stored inference settings.
        device_name: ``auto``, ``cpu`` or ``cuda``.
        series_uid: the DICOM series to read from folders holding several.

    Returns:
        The predictor and the first model's identity (:class:`registry.ResolvedModel`).
    """
    from pipeline.inference import Predictor, load_model

    device = resolve_device(device_name)
    models, identities = [], []
    for ref in [r for refs in model_refs for r in _checkpoints_of(refs)]:
        with tempfile.TemporaryDirectory(prefix="unet-model-") as tmp:
            resolved = registry.resolve_model(ref, work_dir, Path(tmp))
            models.append(load_model(resolved.path, device))
            identities.append(resolved)
    voxel_plan = {k: v for k, v in models[0].plan.items() if k != "network"}
    for ref, m in zip(model_refs, models):
        if {k: v for k, v in m.plan.items() if k != "network"} != voxel_plan:
            raise PipelineError(f"{ref}: its preprocessing plan differs from the first model's; cannot ensemble")
    return Predictor(models, device, overrides, series_uid), identities[0]


def evaluate_stage(model_refs: Sequence[str], data: str, out_dir: Path, work_dir: Path, overrides=None,
                   device: str = "auto") -> dict[str, Any]:
    """Evaluate a model on every labelled case of a dataset, with its stored inference settings.

    Args:
        model_refs: model references accepted by :func:`registry.resolve_model`, or folders of
            ``fold_*/final.pt``; several are ensembled (softmax averaged).
        data: a ``dataset.json`` or a folder holding one.
        out_dir: where ``cases.csv``, ``summary.json`` and ``predictions/`` go.
        work_dir: work directory (its SQLite store is the default registry).
        overrides: :class:`~pipeline.inference.Overrides` of the stored inference settings.
        device: ``auto``, ``cpu`` or ``cuda``.
    """
    from pipeline.evaluation import evaluate_cases

    dataset = load_dataset(data)
    predictor, _ = load_predictor(model_refs, work_dir, overrides, device)
    return evaluate_cases(predictor, dataset.cases, out_dir).summary


def predict_stage(model_refs: Sequence[str], inputs: Sequence[str], out_dir: Path, work_dir: Path, overrides=None,
                  device: str = "auto", series_uid: str | None = None, save_probabilities: bool = False,
                  write_seg: bool = True, overwrite: bool = False):
    """Segment NIfTI files and DICOM series (or folders of them): one NIfTI label map per case on the
    input's grid, optional probabilities, and a DICOM SEG for DICOM inputs; under ``torchrun`` the cases
    are shared across ranks.

    Args:
        model_refs: model references accepted by :func:`registry.resolve_model`, or folders of
            ``fold_*/final.pt``; several are ensembled (softmax averaged).
        inputs: NIfTI files, DICOM series folders, or folders of them.
        out_dir: output folder (created).
        work_dir: work directory (its SQLite store is the default registry).
        overrides: :class:`~pipeline.inference.Overrides` of the stored inference settings.
        device: ``auto``, ``cpu`` or ``cuda``.
        series_uid: the DICOM series to read from input folders holding several.
        save_probabilities: also write per-class probability maps.
        write_seg: write a DICOM SEG for DICOM series inputs.
        overwrite: redo cases whose outputs already exist.

    Returns:
        The :class:`~pipeline.predict.PredictReport`.
    """
    from pipeline import predict

    predictor, identity = load_predictor(model_refs, work_dir, overrides, device, series_uid)
    found = predict.expand_inputs(inputs)
    cases = predict.group_cases(found, len(predictor.plan["modalities"]))
    algorithm = predict.algorithm_for(identity.name, identity.version)
    return predict.predict_cases(predictor, predict.shard(cases), out_dir, algorithm, series_uid,
                                 save_probabilities, write_seg, overwrite)
