"""Command line: ``unet-pipeline run|preprocess|train|evaluate|predict``. It parses and calls."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import PipelineError

DEFAULT_WORK_DIR = "unet-work"


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


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, action="append", dest="models",
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, a .pt checkpoint, or a folder "
                        "of fold_*/final.pt; repeat to ensemble")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default 0.5)")
    p.add_argument("--sw-batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--mirror", action="store_true", help="test-time augmentation: average over axis flips")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per stage."""
    parser = argparse.ArgumentParser(
        prog="unet-pipeline", description="Train, evaluate and run 2D/3D U-Nets on MRI and CT, tracked in MLflow."
    )
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("run", help="preprocess -> train -> evaluate -> register (no CONFIG: the embedded demo)")
    _add_config_args(p, optional=True)
    _add_common(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (same --work-dir)")
    p = sub.add_parser("preprocess", help="fingerprint, plan and preprocess a dataset (cached)")
    _add_config_args(p, optional=True)
    _add_common(p)
    p = sub.add_parser("train", help="preprocess and train; logs the model to MLflow")
    _add_config_args(p, optional=True)
    _add_common(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted training (same --work-dir)")
    p = sub.add_parser("evaluate", help="Dice per label of a model on a labelled dataset")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="dataset.json or a folder holding one")
    p.add_argument("--out", type=Path, default=None, help="output folder (default WORK_DIR/evaluation)")
    _add_common(p)
    p = sub.add_parser("predict", help="segment NIfTI files or DICOM series folders")
    _add_model_args(p)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="NIfTI file or DICOM series folder")
    p.add_argument("--out", type=Path, required=True, help="output folder for the NIfTI masks")
    p.add_argument("--series-uid", default=None,
                   help="SeriesInstanceUID to read from DICOM folders holding several series")
    _add_common(p)
    return parser


def _print_run_summary(summary) -> None:
    ev = summary.evaluation
    if ev:
        print(f"\nDice per label on {ev['num_cases']} held-out case(s):")
        width = max(len(n) for n in ev["dice_per_label"]) + 2
        for name, value in ev["dice_per_label"].items():
            print(f"  {name:<{width}}{value:.4f}")
        print(f"  {'mean':<{width}}{ev['mean_dice']:.4f}")
    print(f"\nEpochs trained:     {summary.epochs}")
    print(f"Checkpoint:         {summary.checkpoint}")
    print(f"MLflow run id:      {summary.run_id}")
    if summary.promotion:
        p = summary.promotion
        aliases = "candidate, champion" if p.promoted else "candidate"
        print(f"Registered model:   {summary.model_name} version {p.version} (aliases: {aliases})")
        if not p.promoted:
            print(f"                    champion stays version {p.previous_version} "
                  f"(val Dice {p.previous_score:.4f} >= {p.score:.4f})")
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


def user_error(exc: BaseException) -> PipelineError | None:
    """The :class:`PipelineError` behind ``exc``: MONAI's ``Compose`` re-raises transform errors wrapped.

    Args:
        exc: the exception caught.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, PipelineError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``unet-pipeline``; returns the exit code.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_third_party()
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _dispatch(args)
    except Exception as exc:
        cause = user_error(exc)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        return cause.exit_code
    except KeyboardInterrupt:
        print("interrupted: completed outputs are kept; nothing partial was written", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from pipeline import stages
    from pipeline.config import EvaluateConfig, load_config

    work_dir = args.work_dir
    if args.command in ("run", "preprocess", "train"):
        overrides = [*args.overrides, *([f"data.fold={args.fold}"] if args.fold is not None else [])]
        cfg = load_config(args.config, overrides)
        if args.command == "preprocess":
            prepared = stages.prepare(cfg, work_dir)
            print(f"Preprocessed {len(prepared.cases)} case(s) into {prepared.out_dir}")
            print(f"Plan: spacing {prepared.plan['target_spacing']}, normalisation {prepared.plan['normalization']}")
            print(f"Split: {len(prepared.split['train'])} train / {len(prepared.split['val'])} validation")
        else:
            summary = (stages.run_stage if args.command == "run" else stages.train_stage)(cfg, work_dir, args.resume)
            if summary is not None:  # None on torchrun ranks other than 0
                _print_run_summary(summary)
        return 0
    settings = EvaluateConfig(overlap=args.overlap, sw_batch_size=args.sw_batch_size, mirror=args.mirror)
    if not 0 <= settings.overlap < 1 or settings.sw_batch_size < 1:
        raise PipelineError("--overlap must be in [0, 1) and --sw-batch-size >= 1")
    if args.command == "evaluate":
        out = args.out or work_dir / "evaluation"
        summary = stages.evaluate_stage(args.models, args.data, out, work_dir, settings, args.device)
        for name, value in summary["dice_per_label"].items():
            print(f"{name}: {value:.4f}")
        print(f"mean Dice: {summary['mean_dice']:.4f} over {summary['num_cases']} case(s); results in {out}")
        return 0
    written = stages.predict_stage(args.models, args.inputs, args.out, work_dir, settings, args.device,
                                   args.series_uid)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
