"""Foreground-oversampled patch crops and on-the-fly augmentation (MONAI transforms).

A random flip along an axis that maps one label onto another (the plan's ``mirror_pairs``:
a left/right organ pair) swaps those label values too: a flipped left parotid looks like a
right one and is labelled so.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
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


class FlipSwappingPairs(RandFlipd):
    """``RandFlipd`` that also swaps the label values of the pairs a flip along its axis maps onto each other.

    Args:
        keys: the image and label keys.
        prob: probability of the flip.
        spatial_axis: the axis flipped (of the patch, which is the preprocessed array's).
        pairs: label pairs swapped by the flip (:func:`pipeline.data.mirroring.mirror_swaps` of the plan, this axis).
        label_key: which key holds the label map.
    """

    def __init__(self, keys: Sequence[str], prob: float, spatial_axis: int, pairs: Sequence[tuple[int, int]] = (),
                 label_key: str = "label") -> None:
        super().__init__(keys=keys, prob=prob, spatial_axis=spatial_axis)
        self.pairs, self.label_key = [tuple(p) for p in pairs], label_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor], lazy: bool | None = None) -> dict[Hashable, torch.Tensor]:
        d = super().__call__(data, lazy=lazy)
        if self._do_transform and self.pairs and self.label_key in d:
            label = d[self.label_key]
            before = label.clone()
            for a, b in self.pairs:
                label[before == a] = b
                label[before == b] = a
        return d


def train_transforms(cfg: PipelineConfig, patch_size: Sequence[int],
                     mirror_pairs: Mapping[int, Sequence[tuple[int, int]]] | None = None) -> Compose:
    """Foreground-oversampled patch crops and on-the-fly augmentation.

    Args:
        cfg: the pipeline configuration (``train`` section).
        patch_size: the patch size (2 or 3 entries, by ``model.spatial_dims``).
        mirror_pairs: axis -> label pairs a flip along it swaps (:func:`pipeline.data.mirroring.mirror_swaps`
            of the plan); ``None``: none.
    """
    swaps = dict(mirror_pairs or {})
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
            *[FlipSwappingPairs(keys, 0.5, a, swaps.get(a, ())) for a in range(cfg.model.spatial_dims)],
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
