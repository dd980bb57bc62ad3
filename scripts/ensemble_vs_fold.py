"""Fold ensemble against single folds, on cases none of the folds trained on: Dice per label and seconds per case.

Two steps around the pipeline's own commands (run from the repository root)::

    # 1. Hold cases out: a training dataset and a held-out one (hard links into OUT, the shared data untouched).
    .venv/bin/python scripts/ensemble_vs_fold.py split --data ../shared/data/hippocampus --held-out 40 \\
        --out unet-work/hippo-split
    # 2. The five folds (one after the other, or in parallel), then the ensemble, with the held-out set as
    #    registry.evaluation_set (the ensemble is scored and gated there):
    S="--set data.dataset=$PWD/unet-work/hippo-split/train --set registry.evaluation_set=$PWD/unet-work/hippo-split/held_out"
    for k in 0 1 2 3 4; do
        unet-pipeline run configs/hippocampus.yaml $S --set train.time_budget_minutes=10 --fold $k --work-dir unet-work/hippo-cv
    done
    unet-pipeline ensemble configs/hippocampus.yaml $S --set train.time_budget_minutes=10 --work-dir unet-work/hippo-cv
    # 3. The comparison: every fold's exported model and the ensemble on the held-out cases.
    .venv/bin/python scripts/ensemble_vs_fold.py measure --work-dir unet-work/hippo-cv \\
        --data unet-work/hippo-split/held_out --threads 2

``measure`` scores each model with ``unet-pipeline evaluate``'s own code (its stored settings:
mirroring, overlap, postprocessing) and times ``predict`` per case (reading, preprocessing,
sliding window, inversion and postprocessing; the first case is a warm-up and not counted).
It prints a table and writes ``ensemble_vs_fold.json`` to ``--out``.

``fold`` writes one fold's validation cases (the pipeline's own split) as a dataset of their own, to score
models trained on that fold, or several of them as one ensemble, with ``unet-pipeline evaluate``::

    .venv/bin/python scripts/ensemble_vs_fold.py fold --data ../shared/data/hippocampus --fold 0 --out unet-work/val-f0
    unet-pipeline evaluate --model A/checkpoints/fold_0/model.pt --model B/checkpoints/fold_0/model.pt \
        --data unet-work/val-f0 --out unet-work/ens/A+B
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

try:
    from pipeline import stages
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pipeline import stages


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system: copy
        shutil.copyfile(src, dst)


def _write_part(data: Path, meta: dict[str, Any], entries: list[dict[str, Any]], folder: Path, suffix: str) -> Path:
    """Write ``entries`` of the dataset ``data`` (its ``dataset.json`` read as ``meta``) afresh to ``folder``."""
    shutil.rmtree(folder, ignore_errors=True)
    for entry in entries:
        for key in ("image", "label"):
            _link(data / entry[key], folder / entry[key])
    part = {k: v for k, v in meta.items() if k not in ("training", "test", "numTest")}
    part.update({"name": f"{meta.get('name', 'dataset')}-{suffix}", "training": entries, "numTraining": len(entries)})
    (folder / "dataset.json").write_text(json.dumps(part, indent=1))
    return folder / "dataset.json"


def split(data: Path, held_out: int, seed: int, out: Path) -> tuple[Path, Path]:
    """Write ``out/train`` and ``out/held_out``: the dataset's cases, ``held_out`` of them drawn at random.

    Args:
        data: an MSD dataset folder (``dataset.json``, ``imagesTr``, ``labelsTr``).
        held_out: how many cases to hold out.
        seed: the draw's seed.
        out: the folder to write.

    Returns:
        The two ``dataset.json`` files (training, held out).
    """
    meta = json.loads((data / "dataset.json").read_text())
    cases = list(meta["training"])
    if not 0 < held_out < len(cases):
        raise SystemExit(f"--held-out must be between 1 and {len(cases) - 1}, got {held_out}")
    chosen = set(random.Random(seed).sample(range(len(cases)), held_out))
    parts = {"train": [c for i, c in enumerate(cases) if i not in chosen],
             "held_out": [c for i, c in enumerate(cases) if i in chosen]}
    written = [_write_part(data, meta, entries, out / name, name) for name, entries in parts.items()]
    return written[0], written[1]


def fold_cases(data: Path, fold: int, num_folds: int, split_seed: int, out: Path) -> Path:
    """Write fold ``fold``'s validation cases of ``data`` to ``out`` as a dataset of their own (hard links).

    The split is the pipeline's own (``kfold_splits`` over the dataset's case ids), so models and
    ensembles can be scored with ``unet-pipeline evaluate --data OUT`` on exactly the cases a run of
    that fold validated on.

    Args:
        data: an MSD dataset folder (``dataset.json``, ``imagesTr``, ``labelsTr``).
        fold: the fold whose validation cases to write.
        num_folds: ``data.num_folds`` of the runs.
        split_seed: ``data.split_seed`` of the runs.
        out: the folder to write.

    Returns:
        The written ``dataset.json``.
    """
    from pipeline.data import kfold_splits, load_dataset, strip_nifti_suffix

    if not 0 <= fold < num_folds:
        raise SystemExit(f"--fold must be between 0 and {num_folds - 1}, got {fold}")
    folds = kfold_splits([c.case_id for c in load_dataset(data).cases], num_folds, split_seed)
    val = set(folds[fold]["val"])
    meta = json.loads((data / "dataset.json").read_text())
    entries = [e for e in meta["training"] if strip_nifti_suffix(Path(e["label"]).name) in val]
    return _write_part(data, meta, entries, out, f"fold{fold}-validation")


def _seconds_per_case(predictor: Any, cases: list[Any]) -> float:
    """Mean wall seconds of one ``predict`` per case, the first case (warm-up) not counted."""
    times = []
    for case in cases:
        start = time.perf_counter()
        predictor(case.images)
        times.append(time.perf_counter() - start)
    counted = times[1:] or times
    return statistics.fmean(counted)


def measure(work_dir: Path, data: Path, ensemble: str | None, device: str, out: Path) -> list[dict[str, Any]]:
    """Every fold's exported model and the ensemble on ``data``: Dice per label and seconds per case.

    Args:
        work_dir: the work directory the folds ran in (``checkpoints/fold_K/model.pt``).
        data: the held-out dataset (``dataset.json`` or its folder).
        ensemble: the ensemble's reference (default: ``work_dir/checkpoints/ensemble/model.pt``).
        device: ``auto``, ``cpu`` or ``cuda``.
        out: where each model's evaluation and ``ensemble_vs_fold.json`` go.
    """
    from pipeline.data import load_dataset

    cases = list(load_dataset(data).cases)
    models = [(f"fold {p.parent.name.removeprefix('fold_')}", str(p))
              for p in sorted((work_dir / "checkpoints").glob("fold_*/model.pt"))]
    ensemble = ensemble or str(work_dir / "checkpoints" / "ensemble" / "model.pt")
    models.append(("ensemble", ensemble))
    rows = []
    for name, ref in models:
        summary = stages.evaluate_stage([ref], str(data), out / name.replace(" ", "_"), work_dir, device=device)
        predictor, _ = stages.load_predictor([ref], work_dir, device_name=device)
        rows.append({"model": name, "folds": len(predictor.models), "mean_dice": summary["mean_dice"],
                     "dice_per_label": summary["dice_per_label"], "num_cases": summary["num_cases"],
                     "seconds_per_case": _seconds_per_case(predictor, cases)})
    out.mkdir(parents=True, exist_ok=True)
    (out / "ensemble_vs_fold.json").write_text(json.dumps(rows, indent=1))
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The comparison as a Markdown table (the folds' mean as a row of its own).

    Args:
        rows: from :func:`measure`.
    """
    labels = list(rows[0]["dice_per_label"])
    lines = [f"| model | mean Dice | {' | '.join(labels)} | s/case |", "| --- " * (len(labels) + 3) + "|"]
    folds = [r for r in rows if r["model"].startswith("fold")]
    shown = list(rows)
    if folds:
        shown.insert(len(folds), {
            "model": "mean of the folds", "mean_dice": statistics.fmean(r["mean_dice"] for r in folds),
            "dice_per_label": {n: statistics.fmean(r["dice_per_label"][n] for r in folds) for n in labels},
            "seconds_per_case": statistics.fmean(r["seconds_per_case"] for r in folds)})
    for r in shown:
        per_label = " | ".join(f"{r['dice_per_label'][n]:.4f}" for n in labels)
        lines.append(f"| {r['model']} | {r['mean_dice']:.4f} | {per_label} | {r['seconds_per_case']:.2f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``split``, ``fold`` and ``measure``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("split", help="hold cases out of a dataset (hard links, the source untouched)")
    p.add_argument("--data", type=Path, required=True, help="MSD dataset folder")
    p.add_argument("--held-out", type=int, required=True, help="how many cases to hold out")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw")
    p.add_argument("--out", type=Path, required=True, help="writes OUT/train and OUT/held_out")
    p = sub.add_parser("fold", help="one fold's validation cases as a dataset of their own (hard links)")
    p.add_argument("--data", type=Path, required=True, help="MSD dataset folder")
    p.add_argument("--fold", type=int, required=True, help="the fold whose validation cases to write")
    p.add_argument("--num-folds", type=int, default=5, help="data.num_folds of the runs (default 5)")
    p.add_argument("--split-seed", type=int, default=0, help="data.split_seed of the runs (default 0)")
    p.add_argument("--out", type=Path, required=True, help="the folder to write")
    p = sub.add_parser("measure", help="every fold and the ensemble on the held-out cases")
    p.add_argument("--work-dir", type=Path, required=True, help="the work directory the folds ran in")
    p.add_argument("--data", type=Path, required=True, help="the held-out dataset")
    p.add_argument("--ensemble", default=None,
                   help="the ensemble (default WORK_DIR/checkpoints/ensemble/model.pt; or models:/NAME/VERSION)")
    p.add_argument("--device", default="cpu", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (the same for every model)")
    p.add_argument("--out", type=Path, default=None, help="default WORK_DIR/ensemble_vs_fold")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
    """
    args = build_parser().parse_args(argv)
    if args.command == "split":
        train, held_out = split(args.data, args.held_out, args.seed, args.out)
        print(f"training cases: {train}\nheld-out cases: {held_out}")
        return 0
    if args.command == "fold":
        written = fold_cases(args.data, args.fold, args.num_folds, args.split_seed, args.out)
        print(f"fold {args.fold} validation cases: {written}")
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows = measure(args.work_dir, args.data, args.ensemble, args.device, args.out or args.work_dir / "ensemble_vs_fold")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
