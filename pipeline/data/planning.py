"""Experiment planning from the dataset fingerprint: patch size, network depth and widths, batch size.

Follows nnU-Net's rules of thumb, simplified: the patch covers the median case
(on a GPU rounded up to the pooling grid, as nnU-Net does; on a CPU rounded down,
see ``plan_network``), depth pools until the coarsest map is about
4 voxels, widths double per level from a base up to 320, and the batch fills
a voxel budget while never exceeding 5% of the dataset's voxels.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

MAX_FEATURES = 320
# Voxels per batch that nnU-Net's reference (2 x 128^3 at 32 base features) fits in ~10 GB of GPU memory.
GPU_REFERENCE_VOXELS = 2 * 128**3
GPU_REFERENCE_GB = 10.0
# On CPUs time, not memory, is the limit: smaller nets and batches train more updates per minute.
CPU_MAX_PATCH_VOXELS = 64**3
GPU_MAX_PATCH_VOXELS = 160**3


def median_shape_at(fingerprint: dict[str, Any], target_spacing: list[float]) -> list[float]:
    """The median case shape after resampling to ``target_spacing``.

    Args:
        fingerprint: with ``shapes`` and ``spacings`` per case (canonical orientation).
        target_spacing: the plan's spacing in mm.
    """
    shapes = np.asarray(fingerprint["shapes"], dtype=float)
    spacings = np.asarray(fingerprint["spacings"], dtype=float)
    return [float(x) for x in np.median(shapes * spacings / np.asarray(target_spacing), axis=0)]


def plan_network(
    fingerprint: dict[str, Any],
    target_spacing: list[float],
    spatial_dims: int,
    device_type: str,
    memory_gb: float | None = None,
) -> dict[str, Any]:
    """Patch size, features per level and batch size for a dataset.

    Args:
        fingerprint: the dataset fingerprint.
        target_spacing: the plan's spacing in mm.
        spatial_dims: 2 (slices in the first two axes) or 3.
        device_type: ``cuda`` or ``cpu``.
        memory_gb: accelerator memory to plan for (CUDA only); ``None``: 10 GB.
    """
    median = median_shape_at(fingerprint, target_spacing)[: 3 if spatial_dims == 3 else 2]
    gpu = device_type == "cuda"
    max_patch = (GPU_MAX_PATCH_VOXELS if gpu else CPU_MAX_PATCH_VOXELS) if spatial_dims == 3 else 512**2
    # Pool until the smallest edge reaches ~4 voxels; between 2 and 5 poolings.
    pools = int(min(5, max(2, math.floor(math.log2(max(min(median), 8) / 4)))))
    grid = 2**pools
    if gpu:
        patch = [int(math.ceil(m / grid) * grid) for m in median]
    else:
        # On a CPU every voxel costs time, and padding a median case up to the grid costs
        # 30-80% more per patch for no image content: rounding down trades a few border
        # voxels per crop (random crops still see them) for more updates per minute.
        # Hippocampus, 20 CPU minutes: 32x48x32 gave mean Dice 0.889 vs 0.882 for 40x56x40.
        patch = [int(max(grid * 2, math.floor(m / grid) * grid)) for m in median]
    while math.prod(patch) > max_patch:
        axis = int(np.argmax(patch))
        patch[axis] = max(grid * 2, patch[axis] - grid)
        if all(p == grid * 2 for p in patch):
            break
    base = 32 if gpu or spatial_dims == 2 else 16
    features = [min(base * 2**i, MAX_FEATURES) for i in range(pools + 1)]
    patch_voxels = math.prod(patch)
    if gpu:
        scale = (memory_gb or GPU_REFERENCE_GB) / GPU_REFERENCE_GB * (32 / base)
        batch = max(2, int(GPU_REFERENCE_VOXELS * scale / patch_voxels))
    else:
        batch = 2
    dataset_voxels = float(np.sum(np.prod(np.asarray(fingerprint["shapes"], dtype=float), axis=1)))
    if spatial_dims == 2:
        dataset_voxels /= max(1.0, median_shape_at(fingerprint, target_spacing)[2])
    batch = int(max(2, min(batch, math.floor(0.05 * dataset_voxels / patch_voxels))))
    return {
        "spatial_dims": spatial_dims,
        "patch_size": patch,
        "features": features,
        "batch_size": batch,
        "median_shape": median,
        "device_type": device_type,
    }


def thinnest_sides_mm(label: np.ndarray, values: list[int], spacing: list[float]) -> list[float]:
    """For each label value, the thinnest side of its bounding box in mm (NaN where absent).

    Args:
        label: the label map (spatial axes only).
        values: the label values to measure, in order.
        spacing: voxel spacing in mm per axis.
    """
    sides = []
    for value in values:
        mask = label == value
        extent = []
        for axis in range(mask.ndim):
            # A projection per axis instead of nonzero(): no index arrays the size of the structure.
            hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
            extent.append((hit[-1] - hit[0] + 1) * spacing[axis] if hit.size else math.nan)
        sides.append(float(min(extent)))
    return sides


# nnU-Net creates its 3d_lowres configuration when the full-resolution patch covers less than a
# quarter of the median case (``lowres_creation_threshold``) and grows the spacing in 3 % steps.
LOWRES_MIN_COVERAGE = 0.25
LOWRES_STEP = 1.03
# Coarser spacing is only worth it for structures that stay well resolved: the thinnest side of the
# smallest structure's bounding box keeps at least this many voxels.
MIN_STRUCTURE_VOXELS = 8


def _coverage(plan: dict[str, Any]) -> float:
    return math.prod(plan["patch_size"]) / math.prod(plan["median_shape"][: len(plan["patch_size"])])


def _coverage_at(fingerprint: dict[str, Any], spacing: list[float], spatial_dims: int, device_type: str,
                 memory_gb: float | None, patch_size: list[int] | None) -> float:
    """The share of the median case at ``spacing`` one patch covers: the fixed patch's, else the planned one's."""
    if patch_size is None:
        return _coverage(plan_network(fingerprint, spacing, spatial_dims, device_type, memory_gb))
    median = median_shape_at(fingerprint, spacing)[: len(patch_size)]
    return math.prod(patch_size) / math.prod(median)


def plan_spacing(
    fingerprint: dict[str, Any],
    spacing: list[float],
    spatial_dims: int,
    device_type: str,
    memory_gb: float | None = None,
    patch_size: list[int] | None = None,
) -> tuple[list[float], dict[str, Any]]:
    """The spacing to train at: the median spacing, or a lower-resolution stage as nnU-Net's 3d_lowres.

    When the patch this device affords covers less than :data:`LOWRES_MIN_COVERAGE` of the median
    case, the spacing grows (the finest axes first while any is over twice finer than the
    coarsest, then all, as nnU-Net does) until the patch covers that much, but never so far that
    the thinnest labelled structure (``structure_thinnest_mm`` of the fingerprint) falls below
    :data:`MIN_STRUCTURE_VOXELS` voxels across. Predictions are resampled back to each scan's own
    grid, so the stage changes resolution, not what the user gets back.

    A patch the config fixes (``train.patch_size``) is the patch that trains, so the coverage is
    that patch's: a large fixed patch keeps the full resolution where the planned one would not,
    and a small one can call for the coarser stage.

    Args:
        fingerprint: the dataset fingerprint (``shapes``, ``spacings``, ``structure_thinnest_mm``).
        spacing: the full-resolution spacing in mm (the median spacing).
        spatial_dims: 2 or 3; only 3D plans get a lower-resolution stage.
        device_type: ``cuda`` or ``cpu``.
        memory_gb: accelerator memory to plan for (see :func:`plan_network`).
        patch_size: ``train.patch_size`` when the config fixes it; ``None``: the planned patch.
    """
    fullres = [float(s) for s in spacing]
    fixed = [int(p) for p in patch_size] if patch_size is not None else None
    coverage = _coverage_at(fingerprint, fullres, spatial_dims, device_type, memory_gb, fixed)
    stage: dict[str, Any] = {"name": "fullres", "coverage": round(coverage, 3),
                             **({"patch_size": fixed} if fixed is not None else {})}
    if spatial_dims != 3 or coverage >= LOWRES_MIN_COVERAGE:
        return fullres, stage
    known = [t for t in fingerprint.get("structure_thinnest_mm", []) if t is not None]
    if not known:
        return fullres, {**stage, "why": "no labelled structure sizes in the fingerprint"}
    thinnest = min(known)
    current = np.asarray(fullres)
    while coverage < LOWRES_MIN_COVERAGE:
        finer = current.max() / current > 2
        proposal = current * np.where(finer if finer.any() else True, LOWRES_STEP, 1.0)
        if thinnest / proposal.max() < MIN_STRUCTURE_VOXELS:
            break
        current = proposal
        coverage = _coverage_at(fingerprint, current.tolist(), spatial_dims, device_type, memory_gb, fixed)
    if np.allclose(current, fullres):
        return fullres, {**stage, "why": f"the thinnest structure ({thinnest:.1f} mm) would fall below "
                                         f"{MIN_STRUCTURE_VOXELS} voxels at a coarser spacing"}
    return [round(float(s), 4) for s in current], {
        "name": "lowres", "coverage": round(coverage, 3), "fullres_spacing": fullres,
        "fullres_coverage": stage["coverage"], "thinnest_structure_mm": round(thinnest, 1),
        **({"patch_size": fixed} if fixed is not None else {})}
