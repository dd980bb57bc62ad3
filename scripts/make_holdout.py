"""Write a task's held-out test split: the cases no tuning, postprocessing or calibration ever reads.

The lists in ``configs/holdout/`` were made by this script once and are fixed: regenerating them
must give the same files (a test checks it). One case in five is held out, drawn (seed 2026) only
from the cases of folds 2-4 of the stored split (split seed 0): folds 0 and 1 are where this
project's choices were made and first checked (the development fold: patch rounding,
postprocessing, the lower-resolution stage; then the estimate's figures), so none of their cases
may stand for "cases no choice was made on".

A run keeps them out with ``--set data.holdout=holdout/TASK.txt`` (relative to the config file in
``configs/``); ``unet-pipeline evaluate --cases configs/holdout/TASK.txt`` scores only them. See docs/tasks.md.

Usage::

    python scripts/make_holdout.py ../shared/data/hippocampus --out configs/holdout/hippocampus.txt
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.data import kfold_splits, load_dataset  # noqa: E402

SEED = 2026
SHARE = 0.2
DEVELOPMENT_FOLDS = (0, 1)


def holdout_cases(case_ids: Sequence[str], share: float = SHARE, seed: int = SEED) -> list[str]:
    """The held-out cases: ``share`` of all cases, drawn from outside the development folds.

    Args:
        case_ids: every labelled case of the task.
        share: the share of all cases held out.
        seed: the draw's seed.
    """
    folds = kfold_splits(list(case_ids), num_folds=5, seed=0)
    pool = sorted(c for k, fold in enumerate(folds) if k not in DEVELOPMENT_FOLDS for c in fold["val"])
    n = round(share * len(case_ids))
    return sorted(np.random.RandomState(seed).choice(pool, size=n, replace=False).tolist())


def main(argv: Sequence[str] | None = None) -> int:
    """Write the list."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", type=Path, help="the task's dataset folder (dataset.json)")
    parser.add_argument("--out", type=Path, required=True, help="the list to write (configs/holdout/TASK.txt)")
    args = parser.parse_args(argv)
    dataset = load_dataset(args.dataset)
    ids = [c.case_id for c in dataset.cases]
    cases = holdout_cases(ids)
    header = (f"# held-out test split of {dataset.name}: {len(cases)} of {len(ids)} cases, never read "
              f"by tuning, postprocessing or calibration\n# made by: python scripts/make_holdout.py DATASET --out FILE "
              f"(seed {SEED}, from folds 2-4 of split seed 0)\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + "\n".join(cases) + "\n")
    print(f"{args.out}: {len(cases)} of {len(ids)} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
