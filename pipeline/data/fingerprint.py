"""The part of the dataset fingerprint that tells whether a new input is like the training data.

The plan carries :func:`training_fingerprint` (``plan["fingerprint"]``), so every model
knows the spacing, field of view, obliquity and normalised-intensity distribution it was
trained on; :mod:`pipeline.quality.conformity` checks inputs against it.
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


def training_fingerprint(
    modalities: Mapping[str, str], spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]],
    obliquities: Sequence[float], percentiles: Sequence[Sequence[Sequence[float]]],
) -> dict[str, Any]:
    """What the plan keeps of the training cases for :func:`check_conformity` (plain JSON data).

    Args:
        modalities: channel index -> modality name (dataset.json).
        spacings: per case, spacing per axis after reorientation (mm).
        shapes: per case, shape after reorientation.
        obliquities: per case, :func:`obliquity_deg`.
        percentiles: per case, :func:`intensity_percentiles` of its normalised image.
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
    }
