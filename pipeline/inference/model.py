"""Models as they are handed over: a checkpoint rebuilt into a network with its plan and settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.unet import UNet
from pipeline.inference.checkpoints import load_checkpoint
from pipeline.inference.settings import InferenceSettings


@dataclass
class LoadedModel:
    """A network with the preprocessing plan and inference settings it was trained and validated with.

    Args:
        network: the U-Net, in evaluation mode.
        plan: the preprocessing plan (orientation, spacing, normalisation, labels).
        patch_size: the training patch size (the window).
        settings: the stored inference settings.
        checkpoint: the checkpoint metadata (without weights).
    """

    network: UNet
    plan: dict[str, Any]
    patch_size: list[int]
    settings: InferenceSettings
    checkpoint: dict[str, Any]

    @property
    def labels(self) -> dict[int, str]:
        """Label value -> name, background included."""
        return {int(k): v for k, v in self.plan["labels"].items()}


def load_model(path: Path, device: torch.device) -> LoadedModel:
    """Build the U-Net of a checkpoint and load its weights (``weights_only=True``).

    Args:
        path: a ``.pt`` checkpoint written by the train or run stage.
        device: where to put the network.
    """
    return load_model_from_checkpoint(load_checkpoint(path), device)


def load_model_from_checkpoint(ckpt: Mapping[str, Any], device: torch.device) -> LoadedModel:
    """Build the U-Net of an already loaded checkpoint (see :func:`load_model`).

    Args:
        ckpt: the checkpoint's content.
        device: where to put the network.
    """
    network = UNet(**ckpt["model"])
    network.load_state_dict(ckpt["state_dict"])
    network.to(device).eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer", "scaler", "torch_rng")}
    settings = InferenceSettings.from_dict(ckpt.get("inference"))
    return LoadedModel(network, ckpt["plan"], list(ckpt["patch_size"]), settings, meta)
