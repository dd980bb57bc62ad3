"""Two evaluations of the same cases, case by case: the mean Dice difference with its 95 % bootstrap interval.

Reads two ``cases.csv`` files (``unet-pipeline run``/``evaluate`` write them under ``evaluation/fold_K/``),
averages each case's Dice over its labels, and compares A minus B on the cases both scored, with the
project's paired bootstrap (``scripts/benchmark_hippocampus.py``: cases resampled with replacement, seed 0)::

    .venv/bin/python scripts/paired_cases.py WORK_A/evaluation/fold_0/cases.csv WORK_B/evaluation/fold_0/cases.csv
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmark_hippocampus import paired, read_case_means


def main() -> None:
    """Parse the two files, print the comparison (and its JSON with ``--json``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path, help="cases.csv of A")
    p.add_argument("b", type=Path, help="cases.csv of B")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args()
    for path in (args.a, args.b):
        if not path.is_file():
            p.error(f"{path}: no such file")
    result = paired(read_case_means(args.a), read_case_means(args.b))
    if result is None:
        p.error(f"{args.a} and {args.b} have no case in common")
    if args.json:
        print(json.dumps(result))
        return
    low, high = result["ci95"]
    print(f"{result['cases']} cases: A minus B {result['mean_difference']:+.4f} [{low:+.4f}, {high:+.4f}], "
          f"A better on {result['ours_wins']}, B on {result['baseline_wins']}, {result['ties']} equal")


if __name__ == "__main__":
    main()
