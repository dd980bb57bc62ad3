"""Per-label measurements of a label map on the input's own grid: voxel count and volume in mL.

The voxel volume is the absolute determinant of the affine's 3x3 part, so it holds
for anisotropic and oblique grids alike (for an axis-aligned grid it is the product of
the spacings).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def voxel_volume_ml(affine: np.ndarray) -> float:
    """The volume of one voxel in mL (1 mL = 1000 mm^3).

    Args:
        affine: the 4x4 voxel-to-world affine in mm.
    """
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])) / 1000.0)


def spacing_mm(affine: np.ndarray) -> list[float]:
    """The voxel spacing along each array axis, in mm (the norms of the affine's columns).

    Args:
        affine: the 4x4 voxel-to-world affine in mm.
    """
    return [float(s) for s in np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))]


def label_volumes(labels: np.ndarray, affine: np.ndarray, label_names: Mapping[int, str]) -> dict[str, dict[str, float]]:
    """Voxel count and volume of every foreground label (present or not), in label-value order.

    Args:
        labels: the label map on the input's grid.
        affine: its 4x4 affine in mm.
        label_names: label value -> name (background, value 0, is left out).
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64).ravel(), minlength=max(label_names, default=0) + 1)
    unit = voxel_volume_ml(affine)
    return {
        name: {"value": int(value), "voxels": int(counts[value]), "volume_ml": float(counts[value] * unit)}
        for value, name in sorted(label_names.items()) if value != 0
    }
