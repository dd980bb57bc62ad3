"""Which signals should the quality estimate use? Candidate feature sets compared out of sample on finished runs.

For each evaluation folder given, reads the case records the evaluation kept
(``quality_records.json``: every case's signals and true Dice), re-does the calibration's
leave-one-out cross-fit (:func:`pipeline.quality.fit_calibration` with its ``features``) for each
candidate set (the current :data:`~pipeline.quality.calibration.FEATURES`, plus ``fragments``,
plus ``volume_z``, plus both) and prints, per folder and set, the out-of-sample figures the
model would carry: ``spearman_oos``, ``worst5_caught``, ``flagged_share`` and whether that is
reliable (rho >= 0.5, >= 3 of the 5 worst flagged, <= 25 % flagged).

A run evaluated before a signal existed lacks it, and a model without training volumes has
``volume_z`` unknown for every case: the table says so for the sets that need it instead of
fitting on nothing. A folder evaluated before ``quality_records.json`` was written has no
signals at all; ``scripts/quality_calibration.py`` re-validates a fold and writes one.

Usage (after ``unet-pipeline run configs/hippocampus.yaml --work-dir unet-work/hippo``)::

    python scripts/quality_features.py unet-work/hippo/evaluation [unet-work/ct/evaluation ...]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.evaluation.quality_review import RECORDS_FILE  # noqa: E402
from pipeline.quality import fit_calibration  # noqa: E402
from pipeline.quality.calibration import FEATURES  # noqa: E402

#: the feature sets compared: name -> signals, in order.
CANDIDATES: dict[str, tuple[str, ...]] = {
    "current": FEATURES,
    "+fragments": (*FEATURES, "fragments"),
    "+volume_z": (*FEATURES, "volume_z"),
    "+both": (*FEATURES, "fragments", "volume_z"),
}
COLUMNS = ("folder", "features", "cases", "spearman_oos", "worst5_caught", "flagged_share", "reliable")


def record_files(paths: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """The ``quality_records.json`` files under each path, and a note for each path that has none.

    Args:
        paths: evaluation folders, work directories (every evaluation below is taken) or the files themselves.
    """
    found: list[Path] = []
    notes: list[str] = []
    for path in paths:
        here = [path] if path.is_file() else sorted(path.rglob(RECORDS_FILE)) if path.is_dir() else []
        if not here:
            why = "not found" if not path.exists() else (
                f"no {RECORDS_FILE} (evaluated before it was written: no per-case signals; "
                "scripts/quality_calibration.py re-validates a fold and writes one)")
            notes.append(f"{path}: {why}")
        found += here
    return found, notes


def _number(value: Any) -> float:
    """A stored value as a float (``None``, the records' NaN, as NaN)."""
    return math.nan if value is None else float(value)


def load_cases(path: Path) -> tuple[list[dict[int, dict[str, float]]], list[dict[int, float]]]:
    """Per case, label value -> signals and label value -> true Dice, as :func:`fit_calibration` takes them.

    Args:
        path: a ``quality_records.json`` written by an evaluation.
    """
    records = json.loads(path.read_text())["records"]
    signals = [{int(e["value"]): {k: _number(v) for k, v in (e.get("signals") or {}).items()}
                for e in r["labels"].values()} for r in records]
    truth = [{int(e["value"]): _number(e.get("true_dice")) for e in r["labels"].values()} for r in records]
    return signals, truth


def missing(signals: Sequence[Mapping[int, Mapping[str, float]]], features: Sequence[str]) -> str | None:
    """Why ``features`` cannot be fitted on these cases (``None``: they can).

    Args:
        signals: per case, label value -> signals.
        features: a candidate set.
    """
    entries = [s for case in signals for s in case.values()]
    absent = [f for f in features if not any(f in s for s in entries)]
    if absent:
        return f"lacks {', '.join(absent)} (evaluated before the signal existed)"
    unknown = [f for f in features if all(math.isnan(s.get(f, math.nan)) for s in entries)]
    if unknown:
        return f"{', '.join(unknown)} unknown for every case (a model without training volumes)"
    return None


def compare(
    signals: Sequence[Mapping[int, Mapping[str, float]]], truth: Sequence[Mapping[int, float]],
    candidates: Mapping[str, Sequence[str]], flag_quantile: float,
) -> list[dict[str, Any]]:
    """One row per candidate set: the cross-fitted figures of :func:`fit_calibration`, or why there are none.

    Args:
        signals: per case, label value -> signals.
        truth: per case, label value -> true Dice (NaN: label in neither).
        candidates: set name -> features.
        flag_quantile: the share of cases the review threshold flags (``qc.flag_quantile``).
    """
    rows = []
    for name, features in candidates.items():
        row: dict[str, Any] = {"features": name, "cases": len(signals)}
        if (why := missing(signals, features)) is not None:
            rows.append({**row, "note": why})
            continue
        v = fit_calibration(signals, truth, flag_quantile=flag_quantile, features=tuple(features)).validation
        rows.append({**row, **{k: v.get(k, math.nan) for k in ("spearman_oos", "worst5_caught", "flagged_share")},
                     "reliable": "yes" if v.get("reliable") else "no"})
    return rows


def _cell(column: str, value: Any) -> str:
    if not isinstance(value, float):
        return str(value)
    return "nan" if math.isnan(value) else f"{value:.0f}" if column == "worst5_caught" else f"{value:.3f}"


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a plain-text table, one line per folder and feature set (a note in place of the figures).

    Args:
        rows: from :func:`compare`, each with its ``folder``.
    """
    cells = [[_cell(c, r.get(c, "")) for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) if cells else len(c) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths))]
    for r, line in zip(rows, cells):
        if "note" in r:
            line = line[:3] + [r["note"]]
        lines.append("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, compare the candidate sets on every evaluation found, print the table.

    Args:
        argv: the command line (default: ``sys.argv[1:]``).
    """
    from pipeline.config import QcConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="evaluation folders or work directories")
    parser.add_argument("--flag-quantile", type=float, default=QcConfig().flag_quantile,
                        help="the share of cases the threshold flags (default: qc.flag_quantile's default)")
    args = parser.parse_args(argv)
    files, notes = record_files(args.folders)
    rows = []
    for path in files:
        signals, truth = load_cases(path)
        rows += [{"folder": str(path.parent), **row} for row in compare(signals, truth, CANDIDATES, args.flag_quantile)]
    if rows:
        print(table(rows))
    for note in notes:
        print(note)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
