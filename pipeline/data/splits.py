"""Reproducible k-fold cross-validation splits, stored once and reused."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.data.files import write_text_atomic
from pipeline.errors import PipelineError


def kfold_splits(case_ids: Sequence[str], num_folds: int = 5, seed: int = 0) -> list[dict[str, list[str]]]:
    """Split cases into ``num_folds`` folds; fold ``k`` validates on its own cases and trains on the rest.

    The result depends only on the set of ids, ``num_folds`` and ``seed``, not on their order.

    Args:
        case_ids: all labelled case ids.
        num_folds: number of folds (>= 2).
        seed: shuffling seed.
    """
    if num_folds < 2:
        raise PipelineError(f"cross-validation needs at least 2 folds, got {num_folds}")
    if len(case_ids) < num_folds:
        raise PipelineError(f"{len(case_ids)} labelled case(s) cannot be split into {num_folds} folds")
    order = sorted(case_ids)
    np.random.RandomState(seed).shuffle(order)
    chunks = np.array_split(np.array(order, dtype=object), num_folds)
    folds = []
    for k in range(num_folds):
        val = sorted(str(c) for c in chunks[k])
        folds.append({"train": sorted(set(order) - set(val)), "val": val})
    return folds


def _extended(stored: list[dict[str, list[str]]], case_ids: Sequence[str], seed: int) -> list[dict[str, list[str]]]:
    """The stored folds with cases that left removed and new cases added, each to the fold with fewest cases."""
    present = set(case_ids)
    val = [[c for c in fold["val"] if c in present] for fold in stored]
    known = {c for fold in val for c in fold}
    new = sorted(present - known)
    np.random.RandomState(seed).shuffle(new)
    for case in new:
        min(val, key=len).append(case)
    return [{"train": sorted(present - set(v)), "val": sorted(v)} for v in val]


def stored_splits(case_ids: Sequence[str], num_folds: int, seed: int, path: Path) -> list[dict[str, list[str]]]:
    """The folds stored at ``path``, computed and written there first when missing or stale.

    When the cases change (a new labelled case, a case removed) but ``num_folds`` and ``seed`` do not,
    every case that stays keeps its fold and each new case joins the fold with the fewest cases, so a
    model validated on a fold never trained on a case of it; other changes split afresh.

    Args:
        case_ids: all labelled case ids.
        num_folds: number of folds.
        seed: shuffling seed.
        path: the ``splits.json`` file.
    """
    key = {"cases": sorted(case_ids), "num_folds": num_folds, "seed": seed}
    stored = json.loads(path.read_text()) if path.is_file() else {}
    if stored.get("key") == key:
        return stored["folds"]
    old = stored.get("key") or {}
    if old.get("num_folds") == num_folds and old.get("seed") == seed and stored.get("folds"):
        folds = _extended(stored["folds"], case_ids, seed)
    else:
        folds = kfold_splits(case_ids, num_folds, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"key": key, "folds": folds}, indent=1))
    return folds
