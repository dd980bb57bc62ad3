"""Segmentation metrics and the evaluation files every scorer writes (ours and the benchmark peers)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import write_text_atomic


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
    rows: Sequence[Mapping[str, Any]], label_names: Sequence[str], out_dir: Path, extra: Mapping[str, Any] | None = None,
    metrics: Sequence[str] = (),
) -> dict[str, Any]:
    """Write ``cases.csv`` (Dice per case and label, and more metrics) and ``summary.json``, each atomically.

    Args:
        rows: one mapping per case: ``case``, one Dice per label name, and for each of
            ``metrics`` a ``"<metric> <label name>"`` value.
        label_names: the foreground label names, in column order.
        out_dir: the output folder (created).
        extra: more keys for ``summary.json``.
        metrics: further per-label metrics in the rows (e.g. ``hd95``, ``surface_dice``).

    Returns:
        The summary: ``mean_dice``, ``dice_per_label`` (by name), ``num_cases``, for each
        further metric ``<metric>_per_label`` and ``mean_<metric>``, and ``extra``.
    """
    per_label = {name: nanmean([r[name] for r in rows]) for name in label_names}
    summary: dict[str, Any] = {"mean_dice": nanmean(list(per_label.values())), "dice_per_label": per_label,
                               "num_cases": len(rows)}
    for metric in metrics:
        values = {name: nanmean([r[f"{metric} {name}"] for r in rows]) for name in label_names}
        summary[f"{metric}_per_label"] = values
        summary[f"mean_{metric}"] = nanmean(list(values.values()))
    summary.update(extra or {})
    write_text_atomic(out_dir / "cases.csv", csv_text(rows, case_columns(label_names, metrics)))
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=1))
    return summary


def case_columns(label_names: Sequence[str], metrics: Sequence[str] = ()) -> list[str]:
    """The per-case table's columns: ``case``, Dice per label, then ``<metric> <label>`` per further metric.

    Args:
        label_names: foreground label names.
        metrics: further metrics, e.g. ``("hd95", "surface_dice")``.
    """
    return ["case", *label_names, *[f"{m} {n}" for m in metrics for n in label_names]]


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Rows as CSV text (floats with 6 decimals), for a file or ``mlflow.log_text``.

    Args:
        rows: one mapping per row.
        columns: the column order (other keys are left out).
    """
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    return out.getvalue()


def surface_metrics(
    pred: np.ndarray, truth: np.ndarray, labels: Sequence[int], spacing: Sequence[float], tolerance_mm: float = 1.0
) -> dict[int, dict[str, float]]:
    """95th-percentile Hausdorff distance and surface Dice of each label, in millimetres, with MONAI's metrics.

    Both come from the distances between the two boundaries (voxels of a mask with a
    neighbour outside it), measured with the voxel spacing, so anisotropic voxels count
    their true size. ``hd95`` is the larger of the two directed 95th percentiles;
    ``surface_dice`` (normalised surface distance, as in the Medical Segmentation Decathlon)
    is the fraction of both boundaries lying within ``tolerance_mm`` of the other.

    Conventions where a label is missing:

    * absent from both maps: NaN for both, left out of means as :func:`dice_per_label` does;
    * present in only one (a missed or a spurious structure): ``surface_dice`` is 0, and
      ``hd95`` is the diagonal of the image's field of view in mm, the largest distance the
      image can show. This is the BraTS challenge's convention (373.13 mm for its
      240x240x155 1-mm grid): a finite worst case that penalises the miss and keeps means
      defined, where NaN would silently drop the worst cases and infinity would make every
      mean infinite.

    Args:
        pred: predicted label map.
        truth: reference label map of the same shape.
        labels: the label values to score.
        spacing: voxel size in mm along each array axis.
        tolerance_mm: the distance within which boundaries count as agreeing (surface Dice).

    Returns:
        Label value -> ``{"hd95": mm, "surface_dice": 0..1}``.
    """
    import torch
    from monai.metrics.utils import get_edge_surface_distance

    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from the reference's {truth.shape}")
    if len(spacing) != truth.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {truth.ndim}-D label map")
    spacing = [float(s) for s in spacing]
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(truth.shape, spacing)))
    out = {}
    for v in labels:
        p, t = pred == v, truth == v
        has_p, has_t = bool(p.any()), bool(t.any())
        if not (has_p or has_t):
            out[v] = {"hd95": float("nan"), "surface_dice": float("nan")}
            continue
        if has_p != has_t:
            out[v] = {"hd95": diagonal, "surface_dice": 0.0}
            continue
        # The boundary distances both metrics need, once (compute_hausdorff_distance and compute_surface_dice
        # would each find the edges and run both distance transforms); then MONAI's own two formulas.
        _, (pred_to_true, true_to_pred), _ = get_edge_surface_distance(
            torch.from_numpy(p), torch.from_numpy(t), distance_metric="euclidean", spacing=spacing, symmetric=True)
        hd95 = torch.stack([torch.quantile(d, 0.95) for d in (pred_to_true, true_to_pred)]).max().float()
        close = (pred_to_true <= tolerance_mm).sum() + (true_to_pred <= tolerance_mm).sum()
        nsd = close / (len(pred_to_true) + len(true_to_pred))
        out[v] = {"hd95": float(hd95.item()), "surface_dice": float(nsd.float().item())}
    return out
