"""What each command does once parsed: start-up (threads, signals, logging), dispatch to the stages, and the
one-line errors with their exit codes. It calls; the stages wire.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from pipeline.cli.args import _overrides, build_parser
from pipeline.errors import PipelineError, user_error


def _print_dice(ev: dict, cases: str) -> None:
    """Dice per label and the mean, aligned, under a line saying on which cases."""
    print(f"\nDice per label on {ev['num_cases']} {cases}:")
    width = max(len(n) for n in ev["dice_per_label"]) + 2
    for name, value in ev["dice_per_label"].items():
        print(f"  {name:<{width}}{value:.4f}")
    print(f"  {'mean':<{width}}{ev['mean_dice']:.4f}")


def _print_run_summary(summary) -> None:
    if summary.up_to_date:
        print(f"Up to date: data, config and code are unchanged since run {summary.run_id} completed "
              f"({summary.finished}); nothing to do (--force trains again).")
        return
    ev = summary.evaluation
    if ev:
        _print_dice(ev, "held-out case(s)")
    print(f"\nEpochs trained:     {summary.epochs}")
    print(f"Checkpoint:         {summary.checkpoint}")
    print(f"MLflow run id:      {summary.run_id}")
    if summary.promotion:
        p = summary.promotion
        aliases = "candidate, champion" if p.promoted else "candidate"
        print(f"Registered model:   {summary.model_name} version {p.version} (aliases: {aliases})")
        print(f"Champion gate:      {p.decision}")
        print(f"Use it:             unet-pipeline predict --model models:/{summary.model_name}@champion IMAGE --out DIR")
    uri = summary.tracking_uri
    if uri.startswith("sqlite:"):
        print(f"Open the MLflow UI: mlflow ui --backend-store-uri {uri}  (then http://127.0.0.1:5000)")
    else:
        print(f"MLflow tracking:    {uri}")


def _quiet_third_party() -> None:
    """Library deprecation chatter and optional-codec notices would bury the progress bars and summary."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
    logging.getLogger("monai").setLevel(logging.WARNING)
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)


def _sigterm_as_interrupt() -> None:
    """Kubernetes and systemd stop with SIGTERM: end like Ctrl-C (exit 130, nothing half-written, resumable)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``unet-pipeline``; returns the exit code.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_third_party()
    _sigterm_as_interrupt()
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _dispatch(args)
    except Exception as exc:
        cause = user_error(exc) or _lost_peer(exc)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        return cause.exit_code
    except KeyboardInterrupt:
        print("interrupted: completed outputs are kept, nothing partial was written; the next call resumes",
              file=sys.stderr)
        return 130


def _lost_peer(exc: Exception) -> PipelineError | None:
    """A ``torchrun`` job's lost node as one line (only looked for once torch.distributed is in use)."""
    if "torch.distributed" not in sys.modules:
        return None
    from pipeline.training import distributed

    return distributed.lost_peer(exc)


def _size_cpus(args: argparse.Namespace) -> None:
    """Threads and workers from the CPUs this job may use (pipeline/cpus.py), said in one line on stderr."""
    from pipeline import cpus
    from pipeline.config import load_config

    if args.command in ("cache", "dataset"):
        return
    if args.command in ("run", "preprocess", "train", "ensemble"):
        t = load_config(args.config, args.overrides).train
        training = args.command in ("run", "train")
        plan = cpus.start_job(t.num_threads, "train.num_threads", args.command)
        if training:  # after start_job: resolving the device loads torch, which reads the wait policy once
            from pipeline.training import resolve_device

            plan = cpus.with_workers(plan, t.num_workers, resolve_device(t.device).type)
    else:
        if args.threads is not None and args.threads < 1:
            raise PipelineError(f"--threads must be >= 1, got {args.threads}")
        plan = cpus.start_job(args.threads, "--threads", args.command)
    if os.environ.get("LOCAL_RANK", "0") == "0":  # once per host under torchrun
        print(plan.line(), file=sys.stderr)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "worklist":  # reads records and SRs: no network to run, no threads to size
        return _worklist(args)
    # Before anything imports torch: the OpenMP wait policy is read once, when torch loads.
    _size_cpus(args)
    from pipeline import stages
    from pipeline.config import load_config

    if args.command == "cache":
        return _cache(args)
    work_dir = args.work_dir
    if args.command == "pacs":
        return _pacs(args, stages)
    if args.command == "ensemble":
        return _ensemble(args, stages)
    if args.command == "dataset":
        return _dataset(args, stages)
    if args.command in ("run", "preprocess", "train"):
        overrides = [*args.overrides, *([f"data.fold={args.fold}"] if args.fold is not None else [])]
        cfg = load_config(args.config, overrides)
        if args.command == "preprocess":
            prepared = stages.prepare(cfg, work_dir)
            print(f"Preprocessed {len(prepared.cases)} case(s) into {prepared.out_dir}")
            print(f"Plan: spacing {prepared.plan['target_spacing']}, normalisation {prepared.plan['normalization']}")
            print(f"Split: {len(prepared.split['train'])} train / {len(prepared.split['val'])} validation")
        elif args.command == "run":
            summary = stages.run_stage(cfg, work_dir, args.force, args.fail_if_not_promoted)
            if summary is not None:  # None on torchrun ranks other than 0
                _print_run_summary(summary)
        else:
            summary = stages.train_stage(cfg, work_dir, args.force)
            if summary is not None:
                _print_run_summary(summary)
        return 0
    overrides = _overrides(args)
    if args.command == "evaluate":
        out = args.out or work_dir / "evaluation"
        summary = stages.evaluate_stage(args.models, args.data, out, work_dir, overrides, args.device, args.cases)
        for name, value in summary["dice_per_label"].items():
            print(f"{name}: Dice {value:.4f}, HD95 {summary['hd95_per_label'][name]:.2f} mm, "
                  f"surface Dice {summary['surface_dice_per_label'][name]:.4f}")
        print(f"mean Dice: {summary['mean_dice']:.4f} over {summary['num_cases']} case(s); results in {out}")
        return 0
    from pipeline.inference import exit_code

    report = stages.predict_stage(args.models, args.inputs, args.out, work_dir, overrides, args.device,
                                  args.series_uid, args.save_probabilities, args.write_seg, args.overwrite,
                                  args.min_expected_dice, args.rtstruct)
    for files in report.written.values():
        for path in files:
            print(path)
    if report.summary:
        flagged = sum(r["flagged"] for r in report.records.values())
        print(f"{len(report.records)} case(s), {flagged} flagged for review: {report.summary[1]} "
              f"(and {report.summary[0].name})", file=sys.stderr)
    if report.skipped:
        print(f"{len(report.skipped)} case(s) already complete in {args.out}, skipped (--overwrite redoes them)",
              file=sys.stderr)
    if report.failed and (report.written or report.skipped):
        print(f"{len(report.failed)} case(s) failed (reported above); the others are complete", file=sys.stderr)
    return exit_code(report)


def _ensemble(args: argparse.Namespace, stages) -> int:
    from pipeline.config import ConfigError, load_config

    if args.fold is not None:
        raise ConfigError("ensemble: --fold does not apply (the ensemble takes every fold 0..data.num_folds-1)")
    cfg = load_config(args.config, args.overrides)
    # What to tell the user to run for a missing fold: their own command line, with the fold.
    label = " ".join([*([args.config] if args.config else []), *(f"--set {o}" for o in args.overrides),
                      f"--work-dir {args.work_dir}"])
    held_out = str(Path(args.evaluation_set).resolve()) if args.evaluation_set else None
    s = stages.ensemble_stage(cfg, args.work_dir, args.force, args.fail_if_not_promoted, label, held_out)
    if s.up_to_date:
        print(f"Up to date: folds {', '.join(str(f['fold']) for f in s.folds)} (these very runs) are registered as "
              f"{s.model_name} version {s.version} by run {s.run_id}; nothing to do (--force registers again).")
        return 0
    print(f"Fold ensemble of {len(s.folds)} folds:")
    for f in s.folds:
        print(f"  fold {f['fold']}: run {f['run_id']}, version {f['version']}, validation Dice {f['val_mean_dice']:.4f}")
    ev = s.evaluation
    _print_dice(ev, "evaluation-set case(s) none of the folds trained on")
    print(f"\nEnsemble file:      {s.checkpoint}")
    print(f"MLflow run id:      {s.run_id}")
    if s.promotion:
        p = s.promotion
        print(f"Registered model:   {s.model_name} version {p.version} "
              f"(aliases: {'candidate, champion' if p.promoted else 'candidate'})")
        print(f"Champion gate:      {p.decision}")
        print(f"Use it:             unet-pipeline predict --model models:/{s.model_name}/{p.version} IMAGE --out DIR")
    return 0


def _dataset(args: argparse.Namespace, stages) -> int:
    import json

    from pipeline.config import ConfigError, load_config

    if args.dataset_command is None:
        raise ConfigError("dataset: choose 'check' or 'export' (see unet-pipeline dataset --help)")
    cfg = load_config(args.config, args.overrides)
    out = getattr(args, "out", None)
    scan, stats, converted = stages.dataset_stage(cfg, args.source, args.work_dir, out)
    if getattr(args, "json", False):
        print(json.dumps(scan.manifest(), indent=1))
        return 0
    print(f"{'case':<18} {'label':<8} {'algorithm':<13} {'classes':<24} image series / label")
    for c in scan.cases:
        print(f"{c.case:<18} {c.label.kind:<8} {c.label.algorithm_type:<13} {','.join(scan.classes):<24} "
              f"{c.series_uid}  ok{' (reader correction)' if c.reader_correction else ''}")
    for row in scan.not_used:
        print(f"{'not used':<18} {row['label_sop_instance_uid']}: {row['reason']}")
    for row in scan.skipped:
        print(f"{'skipped':<18} {row['label_sop_instance_uid']}: {row['reason']}")
    print(f"{len(scan.cases)} case(s), {len(scan.skipped)} label(s) skipped, {len(scan.not_used)} not used; "
          f"{stats.retrieved} instance(s) retrieved, {converted} conversion(s)"
          + (f"; written to {out}" if out is not None else ""))
    if scan.automatic:
        print(scan.automatic_note())
    return 0 if scan.cases else 2


def _cache(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError, load_config
    from pipeline.registry import clear_cache, list_cache

    if args.cache_command == "clear":
        print(clear_cache(args.model, args.version))
    elif args.cache_command == "list":
        if args.config:
            print("\n".join(list_cache(load_config(args.config).registry.model_cache_max_gb, args.config)))
        else:
            print("\n".join(list_cache()))
    else:
        raise ConfigError("cache: choose 'list' or 'clear' (see unet-pipeline cache --help)")
    return 0


def _worklist(args: argparse.Namespace) -> int:
    from pipeline import stages
    from pipeline.config import load_config

    cfg = load_config(args.config)
    listed = stages.worklist_stage(args.sources, cfg.pacs, args.model, args.structure, args.limit,
                                   cfg.data.reader_edit_rules, args.viewer_url)
    shown, said = listed.publish(args.out, args.json)
    for line in shown:
        print(line)
    if said:
        print(said, file=sys.stderr)
    return 0


def _pacs(args: argparse.Namespace, stages) -> int:
    import dataclasses
    from datetime import date

    from pipeline.config import ConfigError, load_config

    if args.pacs_command is None:
        raise ConfigError("pacs: choose 'predict' or 'watch' (see unet-pipeline pacs --help)")
    pacs_cfg = load_config(args.config).pacs
    changes = {k: v for k, v in (("url", args.url), ("modality", args.modality),
                                 ("series_description", args.series_description), ("min_slices", args.min_slices),
                                 ("rtstruct", args.rtstruct))
               if v is not None}
    pacs_cfg = dataclasses.replace(pacs_cfg, **changes)
    if not pacs_cfg.url:
        raise ConfigError("pacs: give the DICOMweb root with --url (or pacs.url in --config)")
    overrides = _overrides(args)
    if args.pacs_command == "predict":
        done = stages.pacs_predict_stage(pacs_cfg.url, args.study, args.series, args.models, args.work_dir, pacs_cfg,
                                         overrides, args.device, args.out)
        for path in done.local_files:
            print(path, file=sys.stderr)
        if done.rtstruct_sop_instance_uid:
            print(f"RTSTRUCT {done.rtstruct_sop_instance_uid}", file=sys.stderr)
        print(done.seg_sop_instance_uid)
        return 0
    since = None
    if args.since:
        try:
            since = date.fromisoformat(args.since)
        except ValueError:
            raise ConfigError(f"--since: '{args.since}' is not a date (YYYY-MM-DD)") from None
    report = stages.pacs_watch_stage(pacs_cfg.url, args.models, args.work_dir, pacs_cfg, since, overrides, args.device)
    for line in report.lines():
        print(line)
    report.raise_for_failures()
    return 0


if __name__ == "__main__":
    sys.exit(main())
