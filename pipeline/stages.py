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
from pipeline.config import EvaluateConfig, PipelineConfig
from pipeline.dataset import Case, Dataset, load_dataset, strip_nifti_suffix
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
    from pipeline.evaluation import evaluate_cases
    from pipeline.inference import Predictor, load_model

    prepared = prepare_distributed(cfg, work_dir)
    context, uri, run_id = _start_run(cfg, work_dir, resume)
    with context as run:
        result = _train(cfg, work_dir, prepared, resume, run_id)
        distributed.shutdown()
        if run is None:
            return None
        import mlflow

        device = resolve_device(cfg.train.device)
        chosen = result.final_checkpoint if cfg.evaluate.checkpoint == "final" else result.best_checkpoint
        mlflow.set_tag("evaluate.checkpoint", cfg.evaluate.checkpoint)
        predictor = Predictor([load_model(chosen, device)], cfg.evaluate, device)
        out_dir = work_dir / "evaluation"
        summary = evaluate_cases(predictor, prepared.raw_cases("val"), out_dir)
        mlflow.log_metric(registry.SELECTION_METRIC, summary["mean_dice"])
        mlflow.log_metrics({f"val_dice_{_metric_name(k)}": v for k, v in summary["dice_per_label"].items()})
        mlflow.log_artifact(str(out_dir / "cases.csv"), "evaluation")
        mlflow.log_artifact(str(out_dir / "summary.json"), "evaluation")
        version = registry.log_model(
            chosen, len(prepared.plan["modalities"]), cfg.model.spatial_dims, cfg.mlflow.model_name
        )
        promotion = registry.promote(cfg.mlflow.model_name, version, summary["mean_dice"]) if version else None
    return RunSummary(run.info.run_id, uri, summary, cfg.mlflow.model_name, promotion, result.epochs, chosen)


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


def _load_predictor(model_refs: Sequence[str], work_dir: Path, settings: EvaluateConfig, device_name: str,
                    series_uid: str | None = None):
    """One predictor averaging every referenced model (all must share one preprocessing plan)."""
    from pipeline.inference import Predictor, load_model

    device = resolve_device(device_name)
    models = []
    for ref in [r for refs in model_refs for r in _checkpoints_of(refs)]:
        with tempfile.TemporaryDirectory(prefix="unet-model-") as tmp:
            models.append(load_model(registry.resolve_model(ref, work_dir, Path(tmp)), device))
    voxel_plan = {k: v for k, v in models[0].plan.items() if k != "network"}
    for ref, m in zip(model_refs, models):
        if {k: v for k, v in m.plan.items() if k != "network"} != voxel_plan:
            raise PipelineError(f"{ref}: its preprocessing plan differs from the first model's; cannot ensemble")
    return Predictor(models, settings, device, series_uid)


def evaluate_stage(model_refs: Sequence[str], data: str, out_dir: Path, work_dir: Path, settings: EvaluateConfig,
                   device: str = "auto") -> dict[str, Any]:
    """Evaluate a model on every labelled case of a dataset.

    Args:
        model_refs: model references accepted by :func:`registry.resolve_model`, or folders of
            ``fold_*/final.pt``; several are ensembled (softmax averaged).
        data: a ``dataset.json`` or a folder holding one.
        out_dir: where ``cases.csv`` and ``summary.json`` go.
        work_dir: work directory (its SQLite store is the default registry).
        settings: sliding-window settings.
        device: ``auto``, ``cpu`` or ``cuda``.
    """
    from pipeline.evaluation import evaluate_cases

    dataset = load_dataset(data)
    predictor = _load_predictor(model_refs, work_dir, settings, device)
    return evaluate_cases(predictor, dataset.cases, out_dir)


def _group_inputs(inputs: Sequence[str], channels: int) -> list[tuple[str, list[Path]]]:
    """One case per input; with several channels, nnU-Net's ``_0000``, ``_0001``... files form a case."""
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.exists():
            raise InputDataError(p, "input not found")
    if channels == 1:
        return [(strip_nifti_suffix(p.name), [p]) for p in paths]
    groups: dict[str, list[Path]] = {}
    for p in sorted(paths):
        match = re.fullmatch(r"(.+)_(\d{4})", strip_nifti_suffix(p.name))
        if not match:
            raise InputDataError(p, f"the model takes {channels} channels: name inputs CASE_0000, CASE_0001, ...")
        groups.setdefault(match.group(1), []).append(p)
    for case_id, files in groups.items():
        if len(files) != channels:
            raise InputDataError(files[0], f"case '{case_id}' has {len(files)} channel file(s), the model takes {channels}")
    return list(groups.items())


def predict_stage(model_refs: Sequence[str], inputs: Sequence[str], out_dir: Path, work_dir: Path, settings: EvaluateConfig,
                  device: str = "auto", series_uid: str | None = None) -> list[Path]:
    """Write one NIfTI label map per input case, on the input's grid and with its affine.

    Each file is written under a temporary name and renamed, so an interrupted
    run never leaves a partial mask.

    Args:
        model_refs: model references accepted by :func:`registry.resolve_model`, or folders of
            ``fold_*/final.pt``; several are ensembled (softmax averaged).
        inputs: NIfTI files or DICOM series folders.
        out_dir: output folder (created).
        work_dir: work directory (its SQLite store is the default registry).
        settings: sliding-window settings.
        device: ``auto``, ``cpu`` or ``cuda``.
        series_uid: the DICOM series to read from input folders holding several.
    """
    from tqdm import tqdm

    from transforms.readers import write_nifti_atomic

    predictor = _load_predictor(model_refs, work_dir, settings, device, series_uid)
    cases = _group_inputs(inputs, len(predictor.plan["modalities"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for case_id, files in tqdm(cases, desc="predict", unit="case", leave=False):
        labels, affine = predictor(files)
        target = out_dir / f"{case_id}.nii.gz"
        write_nifti_atomic(labels, affine, target)
        written.append(target)
    return written
