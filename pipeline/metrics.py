"""Segmentation metrics and the evaluation files every scorer writes (ours and the benchmark peers)."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def dice_per_label(pred: np.ndarray, truth: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
    """Dice of each label value; NaN where the label is absent from both maps.

    Args:
        pred: predicted label map.
        truth: reference label map of the same shape.
        labels: the label values to score.
    """
    out = {}
    for v in labels:
        p, t = pred == v, truth == v
        denom = int(p.sum()) + int(t.sum())
        out[v] = float("nan") if denom == 0 else 2.0 * float(np.logical_and(p, t).sum()) / denom
    return out


def nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values (NaN when there are none), as nnU-Net averages Dice.

    Args:
        values: per-case scores, NaN for cases without the label.
    """
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def write_evaluation(
    rows: Sequence[Mapping[str, Any]], label_names: Sequence[str], out_dir: Path, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Write ``cases.csv`` (Dice per case and label) and ``summary.json``, each atomically.

    Args:
        rows: one mapping per case: ``case`` and one Dice per label name.
        label_names: the foreground label names, in column order.
        out_dir: the output folder (created).
        extra: more keys for ``summary.json``.

    Returns:
        The summary: ``mean_dice``, ``dice_per_label`` (by name), ``num_cases`` and ``extra``.
    """
    per_label = {name: nanmean([r[name] for r in rows]) for name in label_names}
    summary = {"mean_dice": nanmean(list(per_label.values())), "dice_per_label": per_label, "num_cases": len(rows),
               **(extra or {})}
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_csv = out_dir / ".cases.csv.tmp"
    with tmp_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case", *label_names])
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    tmp_json = out_dir / ".summary.json.tmp"
    tmp_json.write_text(json.dumps(summary, indent=1))
    os.replace(tmp_csv, out_dir / "cases.csv")
    os.replace(tmp_json, out_dir / "summary.json")
    return summary
