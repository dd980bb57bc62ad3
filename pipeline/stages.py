"""The stages wired together: config -> data -> preprocess -> train -> evaluate -> registry."""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
        data_hash: the dataset's content hash.
    """

    dataset: Dataset
    plan: dict[str, Any]
    cases: dict[str, PreprocessedCase]
    split: dict[str, list[str]]
    out_dir: Path
    data_hash: str = ""

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
        checkpoint: the registered checkpoint's path.
        gate: the champion gate's result.
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
    gate: Any = None
    up_to_date: bool = False
    finished: str | None = None


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
    done = preprocess_dataset(cfg, dataset, out_dir)
    folds = stored_splits([c.case_id for c in done.cases], cfg.data.num_folds, cfg.data.split_seed,
                          work_dir / "splits.json")
    return Prepared(dataset, done.plan, {c.case_id: c for c in done.cases}, folds[cfg.data.fold], out_dir,
                    done.data_hash)


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


@dataclass
class RunKeys:
    """What decides whether a run is up to date: the data's content, the config, the code.

    Args:
        data_hash: the dataset's content hash.
        config_hash: hash of the resolved configuration.
        code: package version, git commit and dirty flag.
    """

    data_hash: str
    config_hash: str
    code: dict[str, Any]


def _keys(cfg: PipelineConfig, prepared: Prepared) -> RunKeys:
    from pipeline.scheduling import code_version, config_hash

    return RunKeys(prepared.data_hash, config_hash(cfg.to_dict()), code_version())


def _last_checkpoint_run(work_dir: Path, fold: int) -> str | None:
    from pipeline.checkpoints import load_checkpoint

    last = checkpoint_dir(work_dir, fold) / "last.pt"
    return load_checkpoint(last).get("mlflow_run_id") if last.is_file() else None


def _params(cfg: PipelineConfig, prepared: Prepared, world_size: int) -> dict[str, Any]:
    """MLflow params: the config without paths (the dataset by name and content hash), split and plan sizes."""
    from pipeline.privacy import dataset_label

    params = {k: v for k, v in cfg.flat().items() if k not in ("data.dataset", "registry.evaluation_set")}
    return {**params, "data.dataset": dataset_label(prepared.dataset.name, prepared.data_hash),
            "registry.evaluation_set": "fixed" if cfg.registry.evaluation_set else "validation fold",
            "data.num_cases": len(prepared.cases), "data.num_train": len(prepared.split["train"]),
            "data.num_val": len(prepared.split["val"]), "ddp.world_size": world_size,
            **{f"plan.{k}": v for k, v in prepared.plan["network"].items()}}


class _Session:
    """One call's run: lock, tracking server, state and MLflow run, wired for ``run`` and ``train``."""

    def __init__(self, cfg: PipelineConfig, work_dir: Path, force: bool) -> None:
        self.cfg, self.work_dir, self.force = cfg, work_dir, force
        self.uri: str | None = None
        self.log = None

    def connect(self) -> None:
        from pipeline import tracking

        self.uri = registry.tracking_uri(self.cfg.mlflow.tracking_uri, self.work_dir)
        tracking.connect(self.uri, self.work_dir)  # before any preprocessing: exit 5 at once when down
        registry.setup(self.cfg.mlflow.tracking_uri, self.work_dir, self.cfg.mlflow.experiment)

    def decide(self, prepared: Prepared) -> tuple[str, RunKeys, Any]:
        from pipeline.scheduling import decide_run, load_state

        keys = _keys(self.cfg, prepared)
        state = load_state(self.work_dir, self.cfg.data.fold)
        action = decide_run(state, keys.data_hash, keys.config_hash, keys.code, self.force,
                            _last_checkpoint_run(self.work_dir, self.cfg.data.fold))
        return action, keys, state

    def open_run(self, action: str, state: Any, keys: RunKeys, prepared: Prepared, world_size: int) -> str:
        """Start a new MLflow run, or reopen the interrupted one; log its parameters."""
        import mlflow

        from pipeline import tracking
        from pipeline.privacy import dataset_label, redact_config
        from pipeline.scheduling import RunState, save_state

        reopen = state.run_id if action in ("resume", "finish") and state is not None else None
        if reopen is None and state is not None and state.status in ("running", "trained") and state.run_id:
            # An interrupted run of other inputs is not going to be finished: say so in MLflow.
            with _suppressed():
                mlflow.MlflowClient().set_terminated(state.run_id, "KILLED")
        run = tracking.when_reachable(
            lambda: mlflow.start_run(run_id=reopen, tags=None if reopen else {"data.fold": str(self.cfg.data.fold)}),
            self.uri, self.cfg.mlflow.outage_wait_minutes, "starting the MLflow run")
        run_id = run.info.run_id
        self.log = tracking.RunLogger(self.uri, self.work_dir, run_id, self.cfg.mlflow.outage_wait_minutes)
        if reopen is None:
            save_state(self.work_dir, RunState("running", run_id, keys.data_hash, keys.config_hash, keys.code,
                                               self.cfg.data.fold))
        folds = json.loads((self.work_dir / "splits.json").read_text())["folds"]
        config = redact_config(self.cfg.to_dict(), dataset_label(prepared.dataset.name, prepared.data_hash))
        self.log.start(_params(self.cfg, prepared, world_size), config,
                       {"preprocess": prepared.out_dir / "plans.json"}, folds)
        return run_id

    def mark(self, status: str, keys: RunKeys, run_id: str) -> None:
        from pipeline.scheduling import RunState, load_state, now_iso, save_state

        previous = load_state(self.work_dir, self.cfg.data.fold)
        started = previous.started if previous is not None and previous.run_id == run_id else now_iso()
        save_state(self.work_dir, RunState(status, run_id, keys.data_hash, keys.config_hash, keys.code,
                                           self.cfg.data.fold, started, now_iso() if status == "completed" else None))


def _suppressed():
    from contextlib import suppress

    return suppress(Exception)


def _lock(work_dir: Path, command: str, is_main: bool):
    """The work directory's lock on rank 0 (``torchrun``'s other processes follow rank 0)."""
    from contextlib import nullcontext

    from pipeline.scheduling import work_dir_lock

    return work_dir_lock(work_dir, command) if is_main else nullcontext()


def _train(cfg: PipelineConfig, work_dir: Path, prepared: Prepared, resume: bool, session: _Session | None,
           run_id: str | None):
    """Train this fold; on rank 0 per-epoch metrics go to the run through the on-disk outbox."""
    from pipeline import distributed
    from pipeline.training import train

    env = distributed.current()
    folder = checkpoint_dir(work_dir, cfg.data.fold)
    history = folder / "history.jsonl"
    if not resume:
        history.unlink(missing_ok=True)
    log = session.log.epoch_metrics(history) if env.is_main and session is not None and session.log else None
    result = train(cfg, prepared.plan, prepared.subset("train"), prepared.subset("val"), folder,
                   log_metrics=log, resume=resume, extra_state={"mlflow_run_id": run_id})
    if env.is_main and session is not None and session.log:
        session.log.metrics({"best_val_dice": result.best_val_dice, "epochs_completed": result.epochs,
                             "train_seconds": result.train_seconds, "patches_per_second": result.patches_per_second},
                            "logging the training summary")
        session.log.tags({"train.stopped_by_time_budget": str(result.stopped_by_budget),
                          "ddp.param_checksums": json.dumps(result.param_checksums)})
        session.log.curves(history)
    return result


def _training_result_from_disk(cfg: PipelineConfig, work_dir: Path):
    """A finished training's checkpoints (the ``finish`` action: training done, the rest not yet)."""
    from pipeline.checkpoints import load_checkpoint
    from pipeline.training import TrainResult

    folder = checkpoint_dir(work_dir, cfg.data.fold)
    final = folder / "final.pt"
    epochs = int(load_checkpoint(final).get("epoch") or 0)
    return TrainResult(folder / "best.pt", folder / "last.pt", final, float("nan"), epochs, False)


def _run_or_train(cfg: PipelineConfig, work_dir: Path, force: bool, register: bool,
                  fail_if_not_promoted: bool = False) -> RunSummary | None:
    from pipeline import distributed
    from pipeline.errors import NotPromotedError, TrainingFailedError

    session = _Session(cfg, work_dir, force)
    env = distributed.init(resolve_device(cfg.train.device).type)
    with _lock(work_dir, "run" if register else "train", env.is_main):
        if env.is_main:
            session.connect()
        prepared = prepare_distributed(cfg, work_dir)
        decision = None
        if env.is_main:
            decision = session.decide(prepared)
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
            _, keys, state = decision
            run_id = session.open_run(action, state, keys, prepared, env.world_size)
        try:
            if action == "finish":
                result = _training_result_from_disk(cfg, work_dir)
            else:
                result = _train(cfg, work_dir, prepared, action == "resume", session, run_id)
        except TrainingFailedError:
            if env.is_main:
                session.mark("failed", keys, run_id)
                with _suppressed():
                    session.log.end("FAILED")
            raise
        distributed.shutdown()
        if not env.is_main:
            return None
        session.mark("trained", keys, run_id)
        summary = _finish(cfg, work_dir, prepared, result, session, run_id, register)
        session.log.flush()
        session.log.end("FINISHED")
        session.mark("completed", keys, run_id)
    if fail_if_not_promoted and summary.promotion is not None and not summary.promotion.promoted:
        raise NotPromotedError(f"version {summary.promotion.version} was registered but not promoted: "
                               f"{summary.promotion.decision}")
    return summary


def _finish(cfg: PipelineConfig, work_dir: Path, prepared: Prepared, result: Any, session: _Session, run_id: str,
            register: bool) -> RunSummary:
    """After training: evaluate and export, then (``run``) gate, register, describe."""
    chosen = result.final_checkpoint if cfg.evaluate.checkpoint == "final" else result.best_checkpoint
    log = session.log
    if not register:
        log.call(lambda: registry.log_model(chosen), "logging the model")
        return RunSummary(run_id, session.uri or "", epochs=result.epochs, checkpoint=chosen)
    log.tags({"evaluate.checkpoint": cfg.evaluate.checkpoint})
    evaluation, model_path = validate_and_export(cfg, work_dir, prepared, chosen)
    summary = evaluation.summary
    names = list(summary["dice_per_label"])
    log.metrics({registry.SELECTION_METRIC: summary["mean_dice"],
                 **{f"val_dice_{_metric_name(k)}": v for k, v in summary["dice_per_label"].items()},
                 **{f"val_hd95_{_metric_name(k)}": v for k, v in summary["hd95_per_label"].items()},
                 **{f"val_surface_dice_{_metric_name(k)}": v for k, v in summary["surface_dice_per_label"].items()},
                 "val_mean_dice_without_postprocessing": summary["mean_dice_without_postprocessing"]},
                "logging the evaluation")
    log.evaluation(evaluation, names)
    gate_result, eval_set = _gate(cfg, work_dir, prepared, evaluation, model_path, log)
    version = log.call(lambda: registry.log_model(model_path, cfg.mlflow.model_name), "registering the model")
    promotion = None
    if version is not None:
        _describe(cfg, prepared, run_id, version, summary, model_path, gate_result, eval_set, log)
        promotion = log.call(lambda: registry.set_aliases(cfg.mlflow.model_name, version, gate_result.promoted,
                                                          gate_result.champion_version, gate_result.decision),
                             "setting the aliases")
    return RunSummary(run_id, session.uri or "", summary, cfg.mlflow.model_name, promotion, result.epochs, model_path,
                      gate=gate_result)


def _gate(cfg: PipelineConfig, work_dir: Path, prepared: Prepared, evaluation: Any, model_path: Path, log: Any):
    """Score the candidate and the champion on the same cases, in this call; log the comparison."""
    import mlflow

    from pipeline import gate
    from pipeline.evaluation import evaluate_cases
    from pipeline.inference import Predictor, load_model
    from pipeline.privacy import csv_text

    device = resolve_device(cfg.train.device)
    cases, eval_set = gate.eval_cases(cfg.registry.evaluation_set, prepared.raw_cases("val"))
    names = list(evaluation.summary["dice_per_label"])
    candidate = evaluation
    if cfg.registry.evaluation_set is not None:
        # A fixed set: the candidate as it will be used (its decided postprocessing) on those cases.
        candidate = evaluate_cases(Predictor([load_model(model_path, device)], device), cases,
                                   work_dir / "gate" / "candidate", save_predictions=False)
    name = cfg.mlflow.model_name
    champion_version = log.call(lambda: registry.champion_version(name), "looking up the champion")

    def score_champion(tmp: Path):
        resolved = log.call(lambda: registry.resolve_model(f"models:/{name}/{champion_version}", work_dir, tmp / "model",
                                                           log.uri), "downloading the champion")
        predictor = Predictor([load_model(resolved.path, device)], device)
        return evaluate_cases(predictor, cases, tmp / "evaluation", save_predictions=False)

    result = gate.compare(candidate, score_champion if champion_version else None, champion_version,
                          cfg.registry.promote_margin, log.alias, names)
    log.metrics(gate.metrics(result, _metric_name), "logging the gate")
    log.call(lambda: mlflow.log_text(csv_text(result.rows, result.columns), "gate/comparison.csv"),
             "logging the gate table")
    log.tags({"gate.decision": result.decision, "gate.eval_set": eval_set})
    return result, eval_set


def _describe(cfg: PipelineConfig, prepared: Prepared, run_id: str, version: str, summary: dict[str, Any],
              model_path: Path, gate_result: Any, eval_set: str, log: Any) -> None:
    """Provenance tags and the Markdown description on the new version."""
    import mlflow

    from pipeline import gate, provenance
    from pipeline.checkpoints import load_checkpoint

    keys = _keys(cfg, prepared)
    facts = provenance.Provenance(
        cfg.mlflow.model_name, version, run_id, prepared.dataset.name, prepared.data_hash, len(prepared.cases),
        cfg.data.fold, cfg.data.num_folds, cfg.data.split_seed, len(prepared.split["train"]), len(prepared.split["val"]),
        keys.config_hash, keys.code, prepared.plan, summary, load_checkpoint(model_path)["inference"], gate_result.decision)
    client = mlflow.MlflowClient()
    tags = {**provenance.tags(facts, _metric_name), **gate.tags(gate_result, eval_set)}

    def write() -> None:
        client.update_model_version(cfg.mlflow.model_name, version, description=provenance.description(facts))
        for key, value in tags.items():
            client.set_model_version_tag(cfg.mlflow.model_name, version, key, value)

    log.call(write, "describing the model version")


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


def _pacs_setup(url: str, rules_cfg: Any, verify_tls: bool):
    from pipeline.pacs import PacsClient, SeriesRules

    client = PacsClient(url, verify_tls=verify_tls)
    rules = SeriesRules(rules_cfg.modality, rules_cfg.series_description, rules_cfg.min_slices)
    return client, rules


def pacs_predict_stage(url: str, study_uid: str, series_uid: str | None, model_refs: Sequence[str], work_dir: Path,
                       pacs_cfg: Any, overrides=None, device: str = "auto", keep_in: Path | None = None):
    """Segment one series of a study on the PACS and store the DICOM SEG back into the study.

    Args:
        url: the DICOMweb root.
        study_uid: the study.
        series_uid: the series (``None``: chosen by ``pacs_cfg``'s rules).
        model_refs: the model(s), as for ``predict``.
        work_dir: the work directory (default registry).
        pacs_cfg: :class:`~pipeline.config.PacsConfig` (series rules, TLS).
        overrides: inference setting overrides.
        device: ``auto``, ``cpu`` or ``cuda``.
        keep_in: also keep the NIfTI mask and the SEG in this folder.
    """
    from pipeline.pacs import select_series
    from pipeline.pacs.segment import segment_series
    from pipeline.predict import algorithm_for

    client, rules = _pacs_setup(url, pacs_cfg, pacs_cfg.verify_tls)
    client.ping()
    series = select_series(client.list_series(study_uid), rules, series_uid, study_uid)
    predictor, identity = load_predictor(model_refs, work_dir, overrides, device)
    return segment_series(client, predictor, algorithm_for(identity.name, identity.version), study_uid, series, keep_in)


def pacs_watch_stage(url: str, model_refs: Sequence[str], work_dir: Path, pacs_cfg: Any, since=None, overrides=None,
                     device: str = "auto"):
    """One scheduled pass: segment every study with a matching series and no SEG of this model version yet.

    Holds the work directory's lock; records what it did in ``work_dir/pacs/ledger.json``.

    Args:
        url: the DICOMweb root.
        model_refs: the model(s), as for ``predict``.
        work_dir: the work directory (lock, ledger, default registry).
        pacs_cfg: :class:`~pipeline.config.PacsConfig` (series rules, TLS).
        since: only studies from this date on (``datetime.date``), or ``None``.
        overrides: inference setting overrides.
        device: ``auto``, ``cpu`` or ``cuda``.
    """
    from pipeline.pacs import WatchLedger, model_tag, run_watch_pass
    from pipeline.pacs.segment import segment_series
    from pipeline.predict import algorithm_for
    from pipeline.scheduling import work_dir_lock

    with work_dir_lock(work_dir, "pacs watch"):
        client, rules = _pacs_setup(url, pacs_cfg, pacs_cfg.verify_tls)
        client.ping()
        predictor, identity = load_predictor(model_refs, work_dir, overrides, device)
        algorithm = algorithm_for(identity.name, identity.version)
        tag = model_tag(identity.name, identity.version)

        def process(study_uid: str, series: Any) -> str:
            return segment_series(client, predictor, algorithm, study_uid, series).seg_sop_instance_uid

        return run_watch_pass(client, tag, rules, since, process, WatchLedger(work_dir))
