"""Foreground-oversampled patch crops and on-the-fly augmentation (MONAI transforms).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from monai.transforms import (
    Compose,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    SpatialPadd,
)

from pipeline.config import PipelineConfig
from pipeline.inference import (
    window_size,
)


def train_transforms(cfg: PipelineConfig, patch_size: Sequence[int]) -> Compose:
    """Foreground-oversampled patch crops and on-the-fly augmentation.

    Args:
        cfg: the pipeline configuration (``train`` section).
        patch_size: the patch size (2 or 3 entries, by ``model.spatial_dims``).
    """
    t = cfg.train
    roi = window_size(patch_size, cfg.model.spatial_dims)
    keys = ["image", "label"]
    steps: list = [
        SpatialPadd(keys=keys, spatial_size=roi),
        RandCropByPosNegLabeld(
            keys=keys, label_key="label", spatial_size=roi, pos=t.foreground_ratio, neg=1.0 - t.foreground_ratio,
            num_samples=1, allow_smaller=False,
        ),
    ]
    if t.augment:
        in_plane = cfg.model.spatial_dims == 2
        rotate = (0.0, 0.0, math.pi / 6) if in_plane else (math.pi / 6,) * 3
        steps += [
            RandAffined(
                keys=keys, prob=0.2, rotate_range=rotate, scale_range=(0.15, 0.15, 0.0 if in_plane else 0.15),
                mode=("bilinear", "nearest"), padding_mode="zeros",
            ),
            *([_elastic(cfg.model.spatial_dims, keys, roi)] if t.elastic else []),
            *[RandFlipd(keys=keys, prob=0.5, spatial_axis=a) for a in range(cfg.model.spatial_dims)],
            RandGaussianNoised(keys="image", prob=0.1, std=0.1),
            RandScaleIntensityd(keys="image", prob=0.15, factors=0.25),
            RandAdjustContrastd(keys="image", prob=0.15, gamma=(0.7, 1.5)),
        ]
    return Compose(steps)


def _elastic(spatial_dims: int, keys: list[str], roi: Sequence[int]) -> Any:
    """Elastic deformation (off by default: costly on a CPU, and nnU-Net finds it rarely helps)."""
    if spatial_dims == 2:
        # 2D patches are (X, Y, 1) volumes here: deform in-plane only.
        return RandAffined(keys=keys, prob=0.2, shear_range=(0.1, 0.1), mode=("bilinear", "nearest"))
    # MONAI's tutorial values: the random field is smoothed with sigma, then scaled by magnitude (voxels).
    return Rand3DElasticd(
        keys=keys, prob=0.2, sigma_range=(5.0, 8.0), magnitude_range=(100.0, 200.0), spatial_size=list(roi),
        mode=("bilinear", "nearest"), padding_mode="zeros",
    )
