"""The stages wired together: config -> data -> preprocess -> train -> evaluate -> registry."""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import registry
from pipeline.config import PipelineConfig
from pipeline.data import (
    Case,
    Dataset,
    PreprocessedCase,
    is_dicom_source,
    load_dataset,
    make_demo_dataset,
    materialise,
    preprocess_dataset,
    scan_source,
    stored_splits,
    write_dataset,
)
from pipeline.scheduling import RunSession
from pipeline.training import resolve_device


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
        preprocessed: how many cases this call preprocessed (0: all reused from the cache).
    """

    dataset: Dataset
    plan: dict[str, Any]
    cases: dict[str, PreprocessedCase]
    split: dict[str, list[str]]
    out_dir: Path
    data_hash: str = ""
    preprocessed: int = 0

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
    if is_dicom_source(cfg.data.dataset):
        d = cfg.data
        folder, _ = materialise(d.dataset, d.classes, d.label_aliases, work_dir, d.allow_automatic_labels,
                                cfg.pacs.verify_tls)
        return load_dataset(folder)
    return load_dataset(cfg.data.dataset)


def dataset_stage(cfg: PipelineConfig, source: str, work_dir: Path, out: Path | None = None):
    """Scan a DICOM folder or DICOMweb server with the config's classes; with ``out``, export it there.

    Args:
        cfg: the pipeline configuration (``data.classes``, ``data.label_aliases``, ``pacs.verify_tls``).
        source: a DICOM folder or a DICOMweb URL.
        work_dir: the work directory (its ``dicom_cache`` holds retrieved instances and conversions).
        out: write the nnU-Net v2 / MSD layout and ``manifest.json`` here.

    Returns:
        The :class:`~pipeline.data.DicomScan`, the :class:`~pipeline.data.PullStats` and the conversions made.
    """
    d = cfg.data
    scan, stats, converted = scan_source(source, d.classes, d.label_aliases, work_dir / "dicom_cache",
                                         d.allow_automatic_labels, cfg.pacs.verify_tls)
    if out is not None:
        write_dataset(scan, out, "dicom")
    return scan, stats, converted


def prepare(cfg: PipelineConfig, work_dir: Path) -> Prepared:
    """The preprocess stage: discover, fingerprint, plan, preprocess (cached) and the k-fold split.

    Holds ``work_dir/locks/preprocess.lock`` throughout: fold jobs started together wait for the
    first to preprocess, then find it all cached.

    Args:
        cfg: the pipeline configuration.
        work_dir: the work directory.
    """
    from pipeline.scheduling import preprocess_lock

    with preprocess_lock(work_dir, "preprocess", cfg.data.fold):
        dataset = discover(cfg, work_dir)
        out_dir = work_dir / "preprocessed"
        done = preprocess_dataset(cfg, dataset, out_dir, resolve_device(cfg.train.device))
        folds = stored_splits([c.case_id for c in done.cases], cfg.data.num_folds, cfg.data.split_seed,
                              work_dir / "splits.json")
    return Prepared(dataset, done.plan, {c.case_id: c for c in done.cases}, folds[cfg.data.fold], out_dir,
                    done.data_hash, len(done.redone))


def prepare_distributed(cfg: PipelineConfig, work_dir: Path) -> Prepared:
    """:func:`prepare` on rank 0 first; the other ``torchrun`` processes then read its cache.

    Args:
        cfg: the pipeline configuration.
        work_dir: the work directory.
    """
    from pipeline.training import distributed

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
                  "ddp.param_checksums": json.dumps(result.param_checksums)})
        log.curves(history)
    return result


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
        min_expected_dice=cfg.qc.min_expected_dice, flag_quantile=cfg.qc.flag_quantile)
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
            compile_ahead_of_time(model_path)
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


# Model references -> one predictor (a registered fold ensemble brings every fold) is the registry's.
load_predictor = registry.load_predictor


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
    predictor, identity = load_predictor(model_refs, work_dir, overrides, device)
    return evaluate_cases(predictor, dataset.cases, out_dir,
                          model={"name": identity.name, "version": str(identity.version)}).summary


def predict_stage(model_refs: Sequence[str], inputs: Sequence[str], out_dir: Path, work_dir: Path, overrides=None,
                  device: str = "auto", series_uid: str | None = None, save_probabilities: bool = False,
                  write_seg: bool = True, overwrite: bool = False, min_expected_dice: float | None = None):
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
        min_expected_dice: the review threshold (``None``: the model's).

    Returns:
        The :class:`~pipeline.inference.predict.PredictReport`.
    """
    from pipeline.inference import algorithm_for, expand_inputs, group_cases, predict_cases, shard

    predictor, identity = load_predictor(model_refs, work_dir, overrides, device, series_uid)
    found = expand_inputs(inputs)
    cases = group_cases(found, len(predictor.plan["modalities"]))
    algorithm = algorithm_for(identity.name, identity.version)
    return predict_cases(predictor, shard(cases), out_dir, algorithm, series_uid, save_probabilities, write_seg,
                         overwrite, min_expected_dice=min_expected_dice, batch=cases)


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
    from pipeline.inference import algorithm_for
    from pipeline.pacs import segment_series, select_series

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
    from pipeline.inference import algorithm_for
    from pipeline.pacs import WatchLedger, model_tag, run_watch_pass, segment_series
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
