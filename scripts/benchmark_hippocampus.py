"""Our pipeline against the hand-written MONAI baseline on hippocampus MRI: one run, side by side.

Runs, one after the other and each as its own subprocess (no shared state), (a) ``unet-pipeline run``
with ``configs/hippocampus.yaml`` and (b) ``scripts/monai_baseline.py``, with the same training
time budget, validation fold and thread count. Then prints Dice per label and mean for both, the
difference (ours - baseline) and ratio (ours / baseline), the wall time of each subprocess and the
exact commands, and writes ``WORK_DIR/benchmark.json``.

With ``--only ours|baseline`` one side runs; the other side's result is taken from an existing
``benchmark.json`` in the same work dir when it was run with the same budget, fold, seeds and threads.
With ``--report`` nothing runs: the table is printed again from ``benchmark.json`` and the cases files.
With ``--summarize DIR [DIR ...]`` nothing runs either: the protocol's table over several work dirs
(one per fold and training seed), per fold: each side's mean Dice over its seeds (mean and sd),
the difference, and the case-paired comparison of the seed-averaged per-case Dice, against the
targets (``--target-dice``, ``--target-lead``).

Both sides score the same held-out cases, so the script also compares them case by case: the
mean of the per-case differences with a 95% bootstrap interval, and how many cases each side wins.

Run from anywhere (commands run in the repository root)::

    .venv/bin/python scripts/benchmark_hippocampus.py --budget-minutes 20 --fold 0
    # the protocol: folds 0 and 1, training seeds 0-2, each in its own work dir, then
    .venv/bin/python scripts/benchmark_hippocampus.py --summarize unet-work/benchmark-f*-s*
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin when run with .venv/bin/python
DEFAULT_DATA = "../shared/data/hippocampus"
DEFAULT_WORK_DIR = "unet-work/benchmark"
SIDES = ("ours", "baseline")

# The two commands, as templates filled by build_commands(); edit here to adjust. Placeholders:
# {bin} venv bin folder, {python} this interpreter, {work} work dir (absolute), {budget} minutes,
# {fold}, {num_folds}, {seed} (the split), {train_seed}, {threads},
# {data} the dataset folder (the baseline's; ours reads its config's).
OURS_COMMAND = [
    "{bin}/unet-pipeline", "run", "configs/hippocampus.yaml", "--work-dir", "{work}/ours",
    "--set", "train.time_budget_minutes={budget}",
    "--set", "data.fold={fold}",
    "--set", "data.num_folds={num_folds}",
    "--set", "data.split_seed={seed}",
    "--set", "train.seed={train_seed}",
    "--set", "train.num_threads={threads}",
]
BASELINE_COMMAND = [
    "{python}", "scripts/monai_baseline.py", "--data", "{data}", "--out", "{work}/baseline",
    "--time-budget-minutes", "{budget}", "--fold", "{fold}", "--num-folds", "{num_folds}", "--seed", "{seed}",
    "--train-seed", "{train_seed}", "--threads", "{threads}",
]
# Where each side leaves its evaluation summary (mean_dice, dice_per_label, num_cases).
SUMMARIES = {"ours": "{work}/ours/evaluation/fold_{fold}/summary.json", "baseline": "{work}/baseline/summary.json"}
# ...and its per-case Dice (``case`` column, then one column per label).
CASES = {"ours": "{work}/ours/evaluation/fold_{fold}/cases.csv", "baseline": "{work}/baseline/cases.csv"}
BOOTSTRAP_SAMPLES = 10_000


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(description="Our pipeline vs a hand-written MONAI baseline on hippocampus MRI, "
                                            "same time budget, fold and threads.")
    p.add_argument("--budget-minutes", type=float, default=20.0, help="training time budget of each side (default 20)")
    p.add_argument("--fold", type=int, default=0, help="validation fold (default 0)")
    p.add_argument("--num-folds", type=int, default=5, help="number of folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--train-seed", type=int, default=0,
                   help="training seed of both sides (default 0); the split stays --seed's, so seeds share a fold. "
                        "Give each seed its own --work-dir")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of each side (default 0: all cores)")
    p.add_argument("--data", default=DEFAULT_DATA, help=f"dataset folder for the baseline (default {DEFAULT_DATA}; "
                                                        "ours reads configs/hippocampus.yaml)")
    p.add_argument("--work-dir", type=Path, default=Path(DEFAULT_WORK_DIR),
                   help=f"work directory (default {DEFAULT_WORK_DIR})")
    p.add_argument("--only", choices=SIDES, default=None, help="run one side only")
    p.add_argument("--report", action="store_true", help="run nothing: print the last benchmark.json again")
    p.add_argument("--summarize", type=Path, nargs="+", metavar="DIR", default=None,
                   help="run nothing: the protocol table over these work dirs (one per fold and training seed)")
    p.add_argument("--target-dice", type=float, default=0.895, help="--summarize: our mean Dice target per fold")
    p.add_argument("--target-lead", type=float, default=0.012, help="--summarize: our lead target per fold")
    return p


def _fmt_number(x: float) -> str:
    return f"{x:g}"


def placeholders(args: argparse.Namespace) -> dict[str, str]:
    """The values filled into the command templates."""
    return {
        "bin": str(BIN), "python": sys.executable, "work": str(args.work_dir.resolve()),
        "budget": _fmt_number(args.budget_minutes), "fold": str(args.fold), "num_folds": str(args.num_folds),
        "seed": str(args.seed), "train_seed": str(args.train_seed),
        "threads": str(args.threads or os.cpu_count() or 1), "data": str(args.data),
    }


def build_commands(args: argparse.Namespace) -> dict[str, list[str]]:
    """The command of each side to run (only the ``--only`` one when given), in running order."""
    values = placeholders(args)
    templates = {"ours": OURS_COMMAND, "baseline": BASELINE_COMMAND}
    sides = [args.only] if args.only else list(SIDES)
    return {side: [part.format(**values) for part in templates[side]] for side in sides}


def run_side(command: Sequence[str], log: Path) -> tuple[int, float]:
    """Run one command in the repository root, echoing and logging its output.

    Returns:
        Its exit status and wall time in seconds.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"\n$ {' '.join(command)}", flush=True)
    start = time.monotonic()
    with log.open("w") as f, subprocess.Popen(list(command), cwd=REPO, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        rc = proc.wait()
    return rc, time.monotonic() - start


def _read_summary(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def compare(ours: dict[str, Any] | None, baseline: dict[str, Any] | None) -> dict[str, dict[str, float | None]]:
    """Per label and mean: both Dice values, difference (ours - baseline) and ratio (ours / baseline).

    A side without a summary gives ``None`` values (and no difference or ratio); ``{}`` when neither has one.
    """
    if not ours and not baseline:
        return {}
    a_side, b_side = ours or {"dice_per_label": {}}, baseline or {"dice_per_label": {}}
    names = list(dict.fromkeys([*a_side["dice_per_label"], *b_side["dice_per_label"]]))
    pairs = [(n, a_side["dice_per_label"].get(n), b_side["dice_per_label"].get(n)) for n in names]
    rows: dict[str, dict[str, float | None]] = {}
    for name, a, b in [*pairs, ("mean", a_side.get("mean_dice"), b_side.get("mean_dice"))]:
        ok = a is not None and b is not None and not (math.isnan(a) or math.isnan(b))
        rows[name] = {"ours": a, "baseline": b, "difference": a - b if ok else None,
                      "ratio": a / b if ok and b != 0 else None}
    return rows


def dice_columns(header: Sequence[str]) -> list[str]:
    """The Dice columns of a ``cases.csv``: one per label, named by the label.

    Our evaluation adds ``hd95 LABEL`` and ``surface_dice LABEL`` after them (millimetres and
    fractions that must not enter a mean Dice); the MONAI script's file has the labels only.
    """
    columns = [c for c in header if c != "case"]
    return [c for c in columns if not any(c.endswith(f" {label}") for label in columns if label != c)]


def read_case_means(path: Path) -> dict[str, float]:
    """Per case, the mean Dice over its labels (labels absent from both masks, NaN, are skipped).

    Args:
        path: a ``cases.csv`` written by ``pipeline.evaluation.metrics.write_evaluation``
            (or the MONAI script's, with the Dice columns only).
    """
    means: dict[str, float] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        labels = dice_columns(reader.fieldnames or [])
        for row in reader:
            values = [float(row[k]) for k in labels if row[k] not in ("", None)]
            values = [v for v in values if not math.isnan(v)]
            if values:
                means[row["case"]] = sum(values) / len(values)
    return means


def paired(ours: dict[str, float], baseline: dict[str, float], seed: int = 0) -> dict[str, Any] | None:
    """Case-by-case comparison on the cases both sides scored.

    Returns the number of cases, the mean per-case difference (ours - baseline), its 95% bootstrap
    interval (cases resampled with replacement), and the cases each side wins; ``None`` without common cases.

    Args:
        ours: per-case mean Dice of our pipeline.
        baseline: per-case mean Dice of the baseline.
        seed: bootstrap seed (the interval is reproducible).
    """
    import numpy as np

    common = sorted(set(ours) & set(baseline))
    if not common:
        return None
    diff = np.array([ours[c] - baseline[c] for c in common])
    rng = np.random.default_rng(seed)
    boot = diff[rng.integers(0, len(diff), size=(BOOTSTRAP_SAMPLES, len(diff)))].mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"cases": len(common), "mean_difference": float(diff.mean()), "ci95": [float(low), float(high)],
            "ours_wins": int((diff > 0).sum()), "baseline_wins": int((diff < 0).sum()), "ties": int((diff == 0).sum())}


def _paired_from_files(values: dict[str, str]) -> dict[str, Any] | None:
    paths = {side: Path(CASES[side].format(**values)) for side in SIDES}
    if not all(path.is_file() for path in paths.values()):
        return None
    return paired(read_case_means(paths["ours"]), read_case_means(paths["baseline"]))


def _cell(x: float | None, fmt: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def print_table(result: dict[str, Any]) -> None:
    """The side-by-side table, wall times and commands."""
    runs = result["runs"]
    print(f"\nHippocampus, fold {result['fold']}/{result['num_folds']}, budget {result['budget_minutes']:g} min, "
          f"{result['threads']} thread(s)")
    print(f"{'Dice':<12}{'ours':>10}{'baseline':>10}{'diff':>10}{'ratio':>8}")
    for name, r in result["comparison"].items():
        print(f"{name:<12}{_cell(r['ours']):>10}{_cell(r['baseline']):>10}{_cell(r['difference'], '+.4f'):>10}"
              f"{_cell(r['ratio'], '.3f'):>8}")
    pair = result.get("paired")
    if pair:
        low, high = pair["ci95"]
        print(f"case by case ({pair['cases']} cases): ours - baseline {pair['mean_difference']:+.4f} mean Dice, "
              f"95% bootstrap interval [{low:+.4f}, {high:+.4f}]; ours better on {pair['ours_wins']}, "
              f"baseline on {pair['baseline_wins']}, tied {pair['ties']}")
    for side in SIDES:
        run = runs.get(side)
        if run:
            n = (run.get("summary") or {}).get("num_cases", "?")
            print(f"{side:<9} exit {run['returncode']}, wall {run['wall_seconds']:.0f}s, {n} validation case(s)"
                  f"{'' if run.get('this_invocation', True) else ' (from an earlier invocation)'}")
            print(f"          $ {' '.join(run['command'])}")


def _mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _average_cases(per_seed: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per case, the mean over the seeds that scored it (every seed scores the same fold)."""
    cases: dict[str, list[float]] = {}
    for means in per_seed:
        for case, value in means.items():
            cases.setdefault(case, []).append(value)
    return {case: sum(v) / len(v) for case, v in cases.items()}


def summarize(work_dirs: Sequence[Path]) -> dict[int, dict[str, Any]]:
    """The protocol over several benchmark work dirs, per fold.

    Each side counts the seeds whose run finished with a summary in its dir; dirs of one fold
    must share the budget and the split. Per fold: each side's seeds and per-seed mean Dice, their
    mean and sd, the difference of the means, and ``paired`` on the seed-averaged per-case Dice.

    Args:
        work_dirs: ``--work-dir`` folders of earlier runs (each with a ``benchmark.json``).

    Raises:
        ValueError: a dir without ``benchmark.json``, or dirs of one fold with different budgets or splits.
    """
    folds: dict[int, dict[str, Any]] = {}
    for work in work_dirs:
        result = _read_summary(work / "benchmark.json")
        if result is None:
            raise ValueError(f"{work}: no benchmark.json (run scripts/benchmark_hippocampus.py there first)")
        fold = int(result["fold"])
        entry = folds.setdefault(fold, {"budget_minutes": result["budget_minutes"], "seed": result["seed"],
                                        "dirs": [], **{side: {"seeds": [], "dice": [], "cases": []} for side in SIDES}})
        if (entry["budget_minutes"], entry["seed"]) != (result["budget_minutes"], result["seed"]):
            raise ValueError(f"{work}: fold {fold} was run with another budget or split than {entry['dirs'][0]}")
        entry["dirs"].append(str(work))
        values = {"work": str(work.resolve()), "fold": str(fold)}
        for side in SIDES:
            summary = ((result.get("runs") or {}).get(side) or {}).get("summary")
            cases = Path(CASES[side].format(**values))
            if summary is None or not cases.is_file():
                continue
            entry[side]["seeds"].append(result["train_seed"])
            entry[side]["dice"].append(float(summary["mean_dice"]))
            entry[side]["cases"].append(read_case_means(cases))
    for entry in folds.values():
        for side in SIDES:
            entry[side]["mean"], entry[side]["sd"] = _mean_sd(entry[side]["dice"])
        means = [entry[side]["mean"] for side in SIDES]
        entry["difference"] = means[0] - means[1] if None not in means else None
        entry["paired"] = paired(*[_average_cases(entry[side].pop("cases")) for side in SIDES])
    return dict(sorted(folds.items()))


def print_summary(folds: dict[int, dict[str, Any]], target_dice: float, target_lead: float) -> bool:
    """The protocol table, one row per fold, and whether every fold meets the targets."""
    print(f"{'fold':<5}{'ours (seeds)':<30}{'baseline (seeds)':<30}{'diff':>8}  paired per case (seed means)")
    met = bool(folds)
    for fold, e in folds.items():
        cells = []
        for side in SIDES:
            s = e[side]
            sd = f" sd {s['sd']:.4f}" if s["sd"] is not None else ""
            cells.append(f"{_cell(s['mean'])}{sd} ({len(s['seeds'])}: {','.join(map(str, s['seeds']))})")
        pair = e["paired"]
        text = "-"
        if pair:
            low, high = pair["ci95"]
            text = (f"{pair['mean_difference']:+.4f} [{low:+.4f}, {high:+.4f}], {pair['cases']} cases, "
                    f"ours better on {pair['ours_wins']}")
        print(f"{fold:<5}{cells[0]:<30}{cells[1]:<30}{_cell(e['difference'], '+.4f'):>8}  {text}")
        ok = (e["ours"]["mean"] is not None and e["ours"]["mean"] >= target_dice and e["difference"] is not None
              and e["difference"] >= target_lead and pair is not None and pair["ci95"][0] > 0)
        met &= ok
        print(f"     budget {e['budget_minutes']:g} min; targets: ours >= {target_dice:g}, lead >= {target_lead:g}, "
              f"interval above 0: {'met' if ok else 'NOT met'}")
    return met


def main(argv: Sequence[str] | None = None) -> int:
    """Run the requested side(s), compare, print and write ``benchmark.json``; non-zero if a side failed."""
    args = build_parser().parse_args(argv)
    if args.summarize:
        try:
            folds = summarize(args.summarize)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print_summary(folds, args.target_dice, args.target_lead)
        return 0
    commands = build_commands(args)
    values = placeholders(args)
    work = Path(values["work"])
    if args.report:
        result = _read_summary(work / "benchmark.json")
        if result is None:
            print(f"error: no benchmark.json in {work}: run the benchmark first", file=sys.stderr)
            return 2
        print_table({**result, "paired": _paired_from_files(values)})
        return 0
    settings = {"budget_minutes": args.budget_minutes, "fold": args.fold, "num_folds": args.num_folds,
                "seed": args.seed, "train_seed": args.train_seed, "threads": int(values["threads"]),
                "data": str(args.data)}
    previous = _read_summary(work / "benchmark.json") or {}
    same = all(previous.get(k) == v for k, v in settings.items())
    runs: dict[str, Any] = {}
    if same:
        for side, run in (previous.get("runs") or {}).items():
            if side not in commands:
                runs[side] = {**run, "this_invocation": False}
    failed = False
    for side, command in commands.items():
        started = time.time()
        rc, wall = run_side(command, work / f"{side}.log")
        path = Path(SUMMARIES[side].format(**values))
        fresh = rc == 0 and path.is_file() and path.stat().st_mtime >= started - 1  # never a stale summary
        summary = _read_summary(path) if fresh else None
        if rc == 0 and summary is None:
            print(f"{side}: exit 0 but no fresh summary at {path}", file=sys.stderr)
        failed |= rc != 0 or summary is None
        runs[side] = {"command": command, "returncode": rc, "wall_seconds": wall, "summary": summary,
                      "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    result = {**settings, "runs": runs,
              "comparison": compare((runs.get("ours") or {}).get("summary"), (runs.get("baseline") or {}).get("summary")),
              # Only with both sides' fresh results: never next to a stale cases file.
              "paired": _paired_from_files(values) if all((runs.get(s) or {}).get("summary") for s in SIDES) else None}
    work.mkdir(parents=True, exist_ok=True)
    (work / "benchmark.json").write_text(json.dumps(result, indent=1))
    print_table(result)
    print(f"\nwritten {work / 'benchmark.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
