"""The stages wired together: config -> data -> preprocess -> train -> evaluate -> registry."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline import registry
from pipeline.config import EvaluateConfig, PipelineConfig
from pipeline.dataset import Case, Dataset, load_dataset, strip_nifti_suffix
from pipeline.demo_data import make_demo_dataset
from pipeline.errors import InputDataError, PipelineError
from pipeline.preprocess import PreprocessedCase, preprocess_dataset


@dataclass
class Prepared:
    """The dataset, its plan, preprocessed cases and the train/validation split.

    Args:
        dataset: the discovered dataset.
        plan: the preprocessing plan.
        cases: preprocessed cases by id.
        split: ``{"train": [...ids], "val": [...ids]}``.
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


def make_split(case_ids: Sequence[str], val_fraction: float, seed: int, path: Path) -> dict[str, list[str]]:
    """A reproducible train/validation split, stored in ``path`` and reused while the cases are the same.

    Args:
        case_ids: all case ids.
        val_fraction: share of cases held out for validation.
        seed: shuffling seed.
        path: the ``split.json`` to reuse or write.
    """
    key = {"cases": sorted(case_ids), "val_fraction": val_fraction, "seed": seed}
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return {"train": stored["train"], "val": stored["val"]}
    if len(case_ids) < 2:
        raise PipelineError(f"need at least 2 labelled cases to split into training and validation, got {len(case_ids)}")
    order = sorted(case_ids)
    np.random.RandomState(seed).shuffle(order)
    n_val = min(len(order) - 1, max(1, math.ceil(len(order) * val_fraction)))
    split = {"train": sorted(order[n_val:]), "val": sorted(order[:n_val])}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"key": key, **split}, indent=1))
    os.replace(tmp, path)
    return split


def prepare(cfg: PipelineConfig, work_dir: Path) -> Prepared:
    """The preprocess stage: discover, fingerprint, plan, preprocess (cached) and split.

    Args:
        cfg: the pipeline configuration.
        work_dir: the work directory.
    """
    dataset = discover(cfg, work_dir)
    out_dir = work_dir / "preprocessed"
    plan, cases = preprocess_dataset(cfg, dataset, out_dir)
    split = make_split([c.case_id for c in cases], cfg.data.val_fraction, cfg.data.split_seed, work_dir / "split.json")
    return Prepared(dataset, plan, {c.case_id: c for c in cases}, split, out_dir)


def _train_in_run(cfg: PipelineConfig, work_dir: Path, prepared: Prepared):
    import mlflow

    from pipeline.training import train

    mlflow.log_params(cfg.flat())
    mlflow.log_params({"data.num_cases": len(prepared.cases), "data.num_train": len(prepared.split["train"]),
                       "data.num_val": len(prepared.split["val"])})
    mlflow.log_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config/resolved.yaml")
    mlflow.log_artifact(str(prepared.out_dir / "plan.json"), "preprocess")
    mlflow.log_artifact(str(prepared.out_dir / "fingerprint.json"), "preprocess")
    mlflow.log_artifact(str(work_dir / "split.json"), "preprocess")
    result = train(
        cfg, prepared.plan, prepared.subset("train"), prepared.subset("val"), work_dir / "checkpoints",
        log_metrics=lambda metrics, step: mlflow.log_metrics(metrics, step=step),
    )
    mlflow.log_metrics({"best_val_dice": result.best_val_dice, "epochs_completed": result.epochs})
    mlflow.set_tag("train.stopped_by_time_budget", str(result.stopped_by_budget))
    return result


def train_stage(cfg: PipelineConfig, work_dir: Path) -> RunSummary:
    """Preprocess and train in one MLflow run, logging the model (unregistered).

    Args:
        cfg: the pipeline configuration.
        work_dir: the work directory.
    """
    uri = registry.setup(cfg.mlflow.tracking_uri, work_dir, cfg.mlflow.experiment)
    prepared = prepare(cfg, work_dir)
    import mlflow

    with mlflow.start_run() as run:
        result = _train_in_run(cfg, work_dir, prepared)
        registry.log_model(result.best_checkpoint, len(prepared.plan["modalities"]), cfg.model.spatial_dims)
    return RunSummary(run.info.run_id, uri, epochs=result.epochs, checkpoint=result.best_checkpoint)


def run_stage(cfg: PipelineConfig, work_dir: Path) -> RunSummary:
    """The whole job: preprocess -> train -> evaluate on the held-out cases -> register.

    Args:
        cfg: the pipeline configuration.
        work_dir: the work directory.
    """
    from pipeline.evaluation import evaluate_cases
    from pipeline.inference import Predictor, load_model, resolve_device

    uri = registry.setup(cfg.mlflow.tracking_uri, work_dir, cfg.mlflow.experiment)
    prepared = prepare(cfg, work_dir)
    import mlflow

    with mlflow.start_run() as run:
        result = _train_in_run(cfg, work_dir, prepared)
        device = resolve_device(cfg.train.device)
        predictor = Predictor([load_model(result.best_checkpoint, device)], cfg.evaluate, device)
        out_dir = work_dir / "evaluation"
        summary = evaluate_cases(predictor, prepared.raw_cases("val"), out_dir)
        mlflow.log_metric(registry.SELECTION_METRIC, summary["mean_dice"])
        mlflow.log_metrics({f"val_dice_{_metric_name(k)}": v for k, v in summary["dice_per_label"].items()})
        mlflow.log_artifact(str(out_dir / "cases.csv"), "evaluation")
        mlflow.log_artifact(str(out_dir / "summary.json"), "evaluation")
        version = registry.log_model(
            result.best_checkpoint, len(prepared.plan["modalities"]), cfg.model.spatial_dims, cfg.mlflow.model_name
        )
        promotion = registry.promote(cfg.mlflow.model_name, version, summary["mean_dice"]) if version else None
    return RunSummary(run.info.run_id, uri, summary, cfg.mlflow.model_name, promotion, result.epochs,
                      result.best_checkpoint)


def _metric_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-/ ]", "_", label).replace(" ", "_")


def _load_predictor(model_ref: str, work_dir: Path, settings: EvaluateConfig, device_name: str,
                    series_uid: str | None = None):
    from pipeline.inference import Predictor, load_model, resolve_device

    device = resolve_device(device_name)
    with tempfile.TemporaryDirectory(prefix="unet-model-") as tmp:
        model = load_model(registry.resolve_model(model_ref, work_dir, Path(tmp)), device)
    return Predictor([model], settings, device, series_uid)


def evaluate_stage(model_ref: str, data: str, out_dir: Path, work_dir: Path, settings: EvaluateConfig,
                   device: str = "auto") -> dict[str, Any]:
    """Evaluate a model on every labelled case of a dataset.

    Args:
        model_ref: any model reference accepted by :func:`registry.resolve_model`.
        data: a ``dataset.json`` or a folder holding one.
        out_dir: where ``cases.csv`` and ``summary.json`` go.
        work_dir: work directory (its SQLite store is the default registry).
        settings: sliding-window settings.
        device: ``auto``, ``cpu`` or ``cuda``.
    """
    from pipeline.evaluation import evaluate_cases

    dataset = load_dataset(data)
    predictor = _load_predictor(model_ref, work_dir, settings, device)
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


def predict_stage(model_ref: str, inputs: Sequence[str], out_dir: Path, work_dir: Path, settings: EvaluateConfig,
                  device: str = "auto", series_uid: str | None = None) -> list[Path]:
    """Write one NIfTI label map per input case, on the input's grid and with its affine.

    Each file is written under a temporary name and renamed, so an interrupted
    run never leaves a partial mask.

    Args:
        model_ref: any model reference accepted by :func:`registry.resolve_model`.
        inputs: NIfTI files or DICOM series folders.
        out_dir: output folder (created).
        work_dir: work directory (its SQLite store is the default registry).
        settings: sliding-window settings.
        device: ``auto``, ``cpu`` or ``cuda``.
        series_uid: the DICOM series to read from input folders holding several.
    """
    from tqdm import tqdm

    from transforms.readers import write_nifti_atomic

    predictor = _load_predictor(model_ref, work_dir, settings, device, series_uid)
    cases = _group_inputs(inputs, len(predictor.plan["modalities"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for case_id, files in tqdm(cases, desc="predict", unit="case", leave=False):
        labels, affine = predictor(files)
        target = out_dir / f"{case_id}.nii.gz"
        write_nifti_atomic(labels, affine, target)
        written.append(target)
    return written
