"""Command line: ``unet-pipeline run|ensemble|preprocess|train|evaluate|predict|pacs|worklist|dataset|cache``.

It parses and calls.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import PipelineError, user_error

DEFAULT_WORK_DIR = "unet-work"


def _print_dice(ev: dict, cases: str) -> None:
    """Dice per label and the mean, aligned, under a line saying on which cases."""
    print(f"\nDice per label on {ev['num_cases']} {cases}:")
    width = max(len(n) for n in ev["dice_per_label"]) + 2
    for name, value in ev["dice_per_label"].items():
        print(f"  {name:<{width}}{value:.4f}")
    print(f"  {'mean':<{width}}{ev['mean_dice']:.4f}")


def _add_config_args(p: argparse.ArgumentParser, optional: bool) -> None:
    p.add_argument(
        "config", nargs="?" if optional else None, default=None,
        help="YAML config file" + (" (default: the packaged demo, configs/demo.yaml)" if optional else ""),
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), validated like the file")
    p.add_argument("--fold", type=int, default=None, help="cross-validation fold (same as --set data.fold=K)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--work-dir", type=Path, default=Path(DEFAULT_WORK_DIR),
                   help=f"work directory: data, checkpoints, evaluation, MLflow store (default ./{DEFAULT_WORK_DIR})")


def _add_schedule_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="train again even when data, config and code are unchanged since the last completed run")
    p.add_argument("--resume", action="store_true",
                   help="(kept for old scripts) an interrupted run is resumed automatically by the next plain call")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, action="append", dest="models",
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, a .pt checkpoint, or a folder "
                        "of fold_*/final.pt; repeat to ensemble")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of the network (default: the CPUs this job may use, shared with the other jobs "
                        "on this host: affinity mask, cgroup quota, SLURM_CPUS_PER_TASK, LOCAL_WORLD_SIZE, "
                        "UNET_PIPELINE_JOBS)")
    g = p.add_argument_group("inference settings (default: those the model was validated with, stored in it)")
    g.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time mirroring: average over axis flips")
    g.add_argument("--overlap", type=float, default=None, help="sliding-window overlap in [0, 1)")
    g.add_argument("--mode", choices=["gaussian", "constant"], default=None, help="window blending")
    g.add_argument("--sw-batch-size", type=int, default=None, help="windows (flips included) per forward pass")
    g.add_argument("--postprocess", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the model's keep-largest-component decision (--no-postprocess: raw argmax)")
    g.add_argument("--device-memory-gb", type=float, default=None,
                   help="cap the device memory; past it, stitching moves to host memory, then smaller window batches")
    g.add_argument("--compile", choices=["auto", "on", "off"], default=None,
                   help="CPU: torch.compile the network (auto: once a job is long enough to pay for it)")
    g.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default=None,
                   help="CPU: the network's arithmetic (auto: bfloat16 autocast where the CPU has native bf16)")


def _add_cache_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="YAML config whose registry.model_cache_max_gb and registry.compiled_cache_max_gb cap the "
                        "model and compiled-network caches (the inference settings stay the model's)")


def _overrides(args: argparse.Namespace):
    from pipeline.config import load_config
    from pipeline.inference import Overrides

    # The caches' caps are the machine's: from --config's registry section (the defaults without one).
    registry_cfg = load_config(args.config).registry
    o = Overrides(mirror=args.mirror, overlap=args.overlap, mode=args.mode, sw_batch_size=args.sw_batch_size,
                  postprocess=args.postprocess, memory_cap_gb=args.device_memory_gb, compile=args.compile,
                  precision=args.precision, model_cache_max_gb=registry_cfg.model_cache_max_gb,
                  compiled_cache_max_gb=registry_cfg.compiled_cache_max_gb)
    if o.overlap is not None and not 0 <= o.overlap < 1:
        raise PipelineError(f"--overlap must be in [0, 1), got {o.overlap}")
    if o.sw_batch_size is not None and o.sw_batch_size < 1:
        raise PipelineError(f"--sw-batch-size must be >= 1, got {o.sw_batch_size}")
    if o.memory_cap_gb is not None and o.memory_cap_gb <= 0:
        raise PipelineError(f"--device-memory-gb must be > 0, got {o.memory_cap_gb}")
    return o


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per stage."""
    parser = argparse.ArgumentParser(
        prog="unet-pipeline", description="Train, evaluate and run 2D/3D U-Nets on MRI and CT, tracked in MLflow."
    )
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("run", help="preprocess -> train -> evaluate -> gate -> register (no CONFIG: the embedded demo)")
    _add_config_args(p, optional=True)
    _add_common(p)
    _add_schedule_args(p)
    p.add_argument("--fail-if-not-promoted", action="store_true",
                   help="exit 6 when the new version does not take the champion alias")
    p = sub.add_parser("ensemble", help="register every fold of one cross-validation as one model version "
                                        "(a fold ensemble), gated like a run")
    _add_config_args(p, optional=True)
    _add_common(p)
    p.add_argument("--force", action="store_true",
                   help="register again even when these fold runs were registered as an ensemble before")
    p.add_argument("--fail-if-not-promoted", action="store_true",
                   help="exit 6 when the ensemble does not take the champion alias")
    p.add_argument("--evaluation-set", default=None, metavar="DATASET",
                   help="labelled cases none of the folds trained on, to score and gate the ensemble on "
                        "(default: registry.evaluation_set; give it when the folds ran without one)")
    p = sub.add_parser("preprocess", help="fingerprint, plan and preprocess a dataset (cached)")
    _add_config_args(p, optional=True)
    _add_common(p)
    p = sub.add_parser("train", help="preprocess and train; logs the model to MLflow")
    _add_config_args(p, optional=True)
    _add_common(p)
    _add_schedule_args(p)
    p = sub.add_parser("evaluate", help="Dice per label of a model on a labelled dataset")
    _add_model_args(p)
    _add_cache_config_arg(p)
    p.add_argument("--data", required=True, help="dataset.json or a folder holding one")
    p.add_argument("--out", type=Path, default=None, help="output folder (default WORK_DIR/evaluation)")
    _add_common(p)
    p = sub.add_parser("predict", help="segment NIfTI files or DICOM series folders (or folders of them)")
    _add_model_args(p)
    _add_cache_config_arg(p)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="NIfTI file, DICOM series folder, or a folder holding NIfTI files and/or series folders")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder: CASE.nii.gz and CASE.json (volumes, estimated Dice, review flag) per case "
                        "(+ CASE.seg.dcm and CASE.sr.dcm for DICOM inputs), summary.csv and report.html")
    p.add_argument("--series-uid", default=None,
                   help="SeriesInstanceUID to read from DICOM folders holding several series")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write CASE_probabilities.nii.gz (X, Y, Z, classes), float32")
    p.add_argument("--no-seg", dest="write_seg", action="store_false",
                   help="do not write a DICOM SEG for DICOM series inputs")
    p.add_argument("--rtstruct", action="store_true",
                   help="also write CASE.rtstruct.dcm for DICOM series inputs: a DICOM RTSTRUCT, one ROI per class, "
                        "marked AUTOMATIC, for treatment-planning systems")
    p.add_argument("--overwrite", action="store_true", help="redo cases whose outputs already exist")
    p.add_argument("--min-expected-dice", type=float, default=None,
                   help="flag cases whose estimated Dice of any label is below this (default: the model's, "
                        "chosen on its validation cases)")
    _add_common(p)
    _add_pacs_parsers(sub)
    _add_worklist_parser(sub)
    _add_dataset_parsers(sub)
    _add_cache_parsers(sub)
    return parser


def _add_dataset_parsers(sub: argparse._SubParsersAction) -> None:
    ds = sub.add_parser("dataset", help="check or export a DICOM dataset: SEG/RTSTRUCT labels from a folder or DICOMweb")
    dsub = ds.add_subparsers(dest="dataset_command")
    for name, text in (("check", "list the cases a DICOM source gives for the config's classes, and every label "
                                 "it cannot use, with the reason"),
                       ("export", "write a DICOM source as an nnU-Net v2 / MSD dataset (imagesTr, labelsTr, "
                                  "dataset.json, manifest.json)")):
        p = dsub.add_parser(name, help=text, description=text + ". Credentials for a DICOMweb URL come from "
                            "DICOMWEB_USER/DICOMWEB_PASSWORD or DICOMWEB_TOKEN, as for pacs.")
        p.add_argument("source", help="a folder of DICOM files (any nesting) or a DICOMweb root URL")
        p.add_argument("--config", required=True, help="YAML config naming the classes (data.classes)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value (repeatable)")
        _add_common(p)
        if name == "check":
            p.add_argument("--json", action="store_true", help="print the manifest as JSON instead of the table")
        else:
            p.add_argument("--out", type=Path, required=True, help="the dataset folder to write (replaced whole)")


def _add_worklist_parser(sub: argparse._SubParsersAction) -> None:
    text = "what to correct next: the predictions of predict output folders and PACS SRs, worst estimate first"
    p = sub.add_parser("worklist", help=text, description=text + " (flagged first, as in the report); a series a "
                       "reader corrected since is left out. Credentials for a URL as for pacs (DICOMWEB_*).")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="a predict output folder or a DICOMweb root URL")
    p.add_argument("--model", metavar="NAME", help="this model's predictions (needed when the sources hold several)")
    p.add_argument("--structure", metavar="NAME", help="rank by this structure's estimated Dice, not the case's mean")
    p.add_argument("--limit", type=int, metavar="N", help="list only the N most urgent")
    p.add_argument("--out", type=Path, metavar="FILE.csv", help="write the list as CSV (atomically)")
    p.add_argument("--json", action="store_true", help='print {"items": [...]} as JSON instead of the table')
    p.add_argument("--config", help="YAML config: pacs.verify_tls, pacs.viewer_url, data.reader_edit_rules")
    p.add_argument("--viewer-url", help="OHIF root: a link VIEWER/viewer?StudyInstanceUIDs=UID per study")


def _add_cache_parsers(sub: argparse._SubParsersAction) -> None:
    text = ("the per-user cache of registered model versions (UNET_PIPELINE_CACHE, else ~/.cache/unet-pipeline): "
            "list or clear it")
    cache = sub.add_parser("cache", help=text, description=text + ". Its size cap: UNET_PIPELINE_CACHE_MAX_GB, "
                           "else registry.model_cache_max_gb; past it, the copies used longest ago are evicted.")
    csub = cache.add_subparsers(dest="cache_command", help="what to do with the cache")
    p = csub.add_parser("list", help="list the cached model versions, the one used longest ago first, with the "
                                     "total size and the cap")
    p.add_argument("--config", default=None,
                   help="YAML config whose registry.model_cache_max_gb is the cap shown (the environment overrides it)")
    p = csub.add_parser("clear", help="delete cached model versions (all of them, or one model's); the next use "
                                      "downloads them again")
    p.add_argument("--model", default=None, metavar="NAME", help="only this registered model's versions")
    p.add_argument("--version", default=None, help="only this version (with --model)")


def _add_pacs_parsers(sub: argparse._SubParsersAction) -> None:
    pacs = sub.add_parser("pacs", help="segment series from a PACS over DICOMweb and store the DICOM SEG and SR back")
    psub = pacs.add_subparsers(dest="pacs_command")
    for name, text in (("predict", "segment one study's series and store the SEG and SR into the study"),
                       ("watch", "one scheduled pass: every study with a matching series and no SEG of this model yet")):
        p = psub.add_parser(name, help=text, description=text + ". Credentials come from DICOMWEB_USER/"
                            "DICOMWEB_PASSWORD or DICOMWEB_TOKEN, never from the command line.")
        p.add_argument("--url", default=None, help="DICOMweb root, e.g. https://pacs.example.org/dicom-web (or pacs.url)")
        p.add_argument("--config", default=None, help="YAML config whose 'pacs' section holds url and series rules "
                                                      "(and whose registry section caps the caches, as for predict)")
        p.add_argument("--modality", default=None, help="series rule: Modality (e.g. MR)")
        p.add_argument("--series-description", default=None, help="series rule: regex searched in SeriesDescription")
        p.add_argument("--min-slices", type=int, default=None, help="series rule: fewest instances (default 10)")
        p.add_argument("--rtstruct", action="store_true", default=None,
                       help="also store a DICOM RTSTRUCT (one ROI per class, marked AUTOMATIC) beside the SEG, for "
                            "treatment-planning systems (or pacs.rtstruct: true)")
        _add_model_args(p)
        _add_common(p)
        if name == "predict":
            p.add_argument("--study", required=True, help="StudyInstanceUID")
            p.add_argument("--series", default=None, help="SeriesInstanceUID (default: chosen by the series rules)")
            p.add_argument("--out", type=Path, default=None,
                           help="also keep the NIfTI mask, SEG, SR and case record here (named by the series UID)")
        else:
            p.add_argument("--since", default=None, help="only studies from this date on (YYYY-MM-DD)")


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
        plan = cpus.start_job(t.num_threads, "train.num_threads")
        if training:  # after start_job: resolving the device loads torch, which reads the wait policy once
            from pipeline.training import resolve_device

            plan = cpus.with_workers(plan, t.num_workers, resolve_device(t.device).type)
    else:
        if args.threads is not None and args.threads < 1:
            raise PipelineError(f"--threads must be >= 1, got {args.threads}")
        plan = cpus.start_job(args.threads, "--threads")
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
        summary = stages.evaluate_stage(args.models, args.data, out, work_dir, overrides, args.device)
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
