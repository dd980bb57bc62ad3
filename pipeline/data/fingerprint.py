"""The part of the dataset fingerprint that tells whether a new input is like the training data.

The plan carries :func:`training_fingerprint` (``plan["fingerprint"]``), so every model
knows the spacing, field of view, obliquity and normalised-intensity distribution it was
trained on; :mod:`pipeline.quality.conformity` checks inputs against it. It also carries the
distribution of each label's volume (:func:`label_volume_stats`), which the quality signal
``volume_z`` measures a prediction's structures against.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
_MIN_SCALE = 0.05


def obliquity_deg(affine: np.ndarray) -> float:
    """How far the voxel axes are rotated from the nearest patient axes, in degrees (0: axis-aligned).

    Args:
        affine: a 4x4 voxel-to-world affine.
    """
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    cosines = np.abs(m / np.linalg.norm(m, axis=0, keepdims=True)).max(axis=0)
    return float(np.degrees(np.arccos(np.clip(cosines.min(), -1.0, 1.0))))


def intensity_percentiles(image: np.ndarray) -> list[list[float]]:
    """The :data:`PERCENTILES` of each channel of a normalised image.

    Args:
        image: ``(C, X, Y, Z)`` normalised image (as the network sees it).
    """
    return [[float(v) for v in np.percentile(np.asarray(c, dtype=np.float32), PERCENTILES)] for c in image]


def intensity_distance(percentiles: Sequence[float], median: Sequence[float], scale: Sequence[float]) -> float:
    """How far a case's normalised-intensity percentiles lie from the training median, in robust standard deviations.

    Args:
        percentiles: the case's :func:`intensity_percentiles` of one channel.
        median: the training cases' median of each percentile.
        scale: their robust spread (1.4826 MAD, at least 0.05).
    """
    return float(max(abs(v - m) / s for v, m, s in zip(percentiles, median, scale)))


def label_voxel_counts(label: np.ndarray) -> dict[str, int]:
    """Voxels of each nonzero value of a label map (value as text, JSON keys).

    Args:
        label: an integer label map (any shape).
    """
    flat = np.asarray(label).reshape(-1)
    counts = np.zeros(int(flat.max(initial=0)) + 1, dtype=np.int64)
    # A chunk at a time: bincount widens its input to int64, 8 bytes per voxel of a CT at once.
    for start in range(0, flat.size, 1 << 22):
        counts += np.bincount(flat[start:start + (1 << 22)], minlength=len(counts))
    return {str(v): int(n) for v, n in enumerate(counts) if v and n}


def label_volume_stats(counts: Sequence[Mapping[str, int]], spacing: Sequence[float]) -> dict[str, Any]:
    """The distribution of each label's volume over the training cases, as ``volume_z`` compares with it.

    Per label, over the cases that hold it: the median of the log volume (mL) and its robust
    spread (1.4826 MAD, at least 0.05, so that a label of near-constant volume does not make
    every small difference look extreme). Volumes are logs: they span orders of magnitude and
    vary by a factor rather than by an amount.

    Args:
        counts: per training case, :func:`label_voxel_counts` of its preprocessed label map.
        spacing: the plan's target spacing (mm): the grid of those label maps and of the network's output.

    Returns:
        ``voxel_ml`` (the volume of one voxel of that grid) and ``labels``: value -> ``median``,
        ``scale`` (of the log volumes in mL) and ``cases`` (how many held the label).
    """
    voxel_ml = float(np.prod(np.asarray(spacing, dtype=float))) / 1000.0
    labels: dict[str, dict[str, float]] = {}
    for value in sorted({v for case in counts for v in case}, key=int):
        logs = np.log(np.array([case[value] for case in counts if case.get(value, 0) > 0], dtype=float) * voxel_ml)
        median = float(np.median(logs))
        scale = max(1.4826 * float(np.median(np.abs(logs - median))), _MIN_SCALE)
        labels[value] = {"median": median, "scale": scale, "cases": len(logs)}
    return {"voxel_ml": voxel_ml, "labels": labels}


def training_fingerprint(
    modalities: Mapping[str, str], spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]],
    obliquities: Sequence[float], percentiles: Sequence[Sequence[Sequence[float]]],
    volumes: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What the plan keeps of the training cases for :func:`check_conformity` (plain JSON data).

    Args:
        modalities: channel index -> modality name (dataset.json).
        spacings: per case, spacing per axis after reorientation (mm).
        shapes: per case, shape after reorientation.
        obliquities: per case, :func:`obliquity_deg`.
        percentiles: per case, :func:`intensity_percentiles` of its normalised image.
        volumes: :func:`label_volume_stats` of the training labels (``None``: not kept).
    """
    sp = np.asarray(spacings, dtype=float)
    extent = sp * np.asarray(shapes, dtype=float)
    channels = []
    per_case = np.asarray(percentiles, dtype=float)  # (cases, channels, percentiles)
    for c in range(per_case.shape[1]):
        v = per_case[:, c, :]
        median = np.median(v, axis=0)
        scale = np.maximum(1.4826 * np.median(np.abs(v - median), axis=0), _MIN_SCALE)
        distances = [intensity_distance(row, median, scale) for row in v]
        channels.append({"median": median.tolist(), "scale": scale.tolist(), "max_distance": float(max(distances))})
    return {
        "modalities": dict(modalities), "cases": len(sp),
        "spacing_min": sp.min(0).tolist(), "spacing_max": sp.max(0).tolist(),
        "spacing_median": np.median(sp, axis=0).tolist(),
        "extent_min": extent.min(0).tolist(), "extent_max": extent.max(0).tolist(),
        "obliquity_max": float(max(obliquities, default=0.0)),
        "percentiles": list(PERCENTILES), "intensity": channels,
        **({"volumes": dict(volumes)} if volumes is not None else {}),
    }
