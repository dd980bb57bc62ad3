"""The one preprocessing chain used by training, evaluation and prediction."""

from __future__ import annotations

from typing import Any

import torch
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    Orientationd,
    Spacingd,
)

from transforms.intensity import NormalizeChannelsd
from transforms.readers import MedicalImageReader

# MONAI will change Orientationd's default labels; the NIfTI/RAS meaning is what we want.
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def load_transforms(with_label: bool, series_uid: str | None = None) -> Compose:
    """Load an image (one file or DICOM folder per channel) and optionally its label, channel first.

    Args:
        with_label: also load the ``label`` key.
        series_uid: the DICOM series to read from folders holding several.
    """
    keys = ["image", "label"] if with_label else ["image"]
    return Compose(
        [
            LoadImaged(keys=keys, reader=MedicalImageReader(series_uid=series_uid), image_only=True),
            EnsureChannelFirstd(keys=keys),
            EnsureTyped(keys=keys, track_meta=True),
        ]
    )


def spatial_transforms(plan: dict[str, Any], with_label: bool) -> list:
    """Reorientation to the plan's axis codes and resampling to its target spacing.

    Both are invertible (MONAI records them on the MetaTensor), which is how
    predictions are put back onto the input's own grid.

    Args:
        plan: the preprocessing plan (``orientation``, ``target_spacing``).
        with_label: also transform the ``label`` key (nearest-neighbour).
    """
    keys = ["image", "label"] if with_label else ["image"]
    modes = ["bilinear", "nearest"] if with_label else ["bilinear"]
    # float32 resampling (MONAI's default is float64): half the memory of its dense sampling grid
    # (3.1 -> 1.4 GiB on a 1 mm chest CT), differences within float32 rounding of the coordinates.
    return [
        Orientationd(keys=keys, axcodes=plan["orientation"], labels=RAS_LABELS),
        Spacingd(keys=keys, pixdim=plan["target_spacing"], mode=modes, dtype=torch.float32),
    ]


def preprocessing(plan: dict[str, Any], with_label: bool, series_uid: str | None = None) -> Compose:
    """Load, reorient, resample and normalise: the full chain of a plan.

    Args:
        plan: the preprocessing plan written by the preprocess stage.
        with_label: also load and resample the ``label`` key.
        series_uid: the DICOM series to read from folders holding several.
    """
    return Compose(
        [
            *load_transforms(with_label, series_uid).transforms,
            *spatial_transforms(plan, with_label),
            NormalizeChannelsd(keys="image", schemes=plan["normalization"], ct_stats=plan.get("ct_stats")),
        ]
    )
