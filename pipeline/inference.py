"""Sliding-window inference and predictions put back onto the input's own grid."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.transforms import Invertd

from models.unet import UNet
from pipeline.checkpoints import load_checkpoint
from pipeline.config import EvaluateConfig
from transforms.preprocessing import preprocessing


def window_size(patch_size: Sequence[int], spatial_dims: int) -> list[int]:
    """The 3D window a model sees: a 2D model sees one slice at a time along the last axis.

    Args:
        patch_size: the training patch size (2 or 3 entries).
        spatial_dims: the model's spatial dimensions.
    """
    return [*patch_size[:2], 1] if spatial_dims == 2 else list(patch_size)


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module,
    image: torch.Tensor,
    patch_size: Sequence[int],
    settings: EvaluateConfig,
    device: torch.device,
) -> torch.Tensor:
    """Stitch windowed logits over a whole preprocessed volume.

    Windows run and are stitched on ``device``. With ``settings.mirror`` the
    logits are averaged over all axis flips (test-time augmentation).

    Args:
        model: a network in evaluation mode on ``device``.
        image: ``(C, X, Y, Z)`` preprocessed volume.
        patch_size: the training patch size.
        settings: overlap, blending mode and windows per batch.
        device: where the network runs.

    Returns:
        ``(num_classes, X, Y, Z)`` float32 logits on the CPU.
    """
    spatial_dims = model.spatial_dims
    roi = window_size(patch_size, spatial_dims)

    def run(x: torch.Tensor) -> torch.Tensor:
        if spatial_dims == 2:
            return model(x[..., 0])[..., None]
        return model(x)

    def windows(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            out = sliding_window_inference(
                x, roi_size=roi, sw_batch_size=settings.sw_batch_size, predictor=run, overlap=settings.overlap,
                mode=settings.mode, sw_device=device, device=device,
            )
        return torch.as_tensor(out).float()

    x = image[None].to(device)
    logits = windows(x)
    if settings.mirror:
        # nnU-Net's test-time mirroring: average the logits over every combination of axis flips.
        axes = [2, 3] if spatial_dims == 2 else [2, 3, 4]
        flips = [[a for i, a in enumerate(axes) if mask >> i & 1] for mask in range(1, 2 ** len(axes))]
        for dims in flips:
            logits += torch.flip(windows(torch.flip(x, dims)), dims)
        logits /= 1 + len(flips)
    return logits[0].cpu()


@dataclass
class LoadedModel:
    """A network with the preprocessing plan it was trained with.

    Args:
        network: the U-Net, in evaluation mode.
        plan: the preprocessing plan (orientation, spacing, normalisation, labels).
        patch_size: the training patch size.
        checkpoint: the checkpoint metadata (without weights).
    """

    network: UNet
    plan: dict[str, Any]
    patch_size: list[int]
    checkpoint: dict[str, Any]

    @property
    def labels(self) -> dict[int, str]:
        """Label value -> name, background included."""
        return {int(k): v for k, v in self.plan["labels"].items()}


def load_model(path: Path, device: torch.device) -> LoadedModel:
    """Build the U-Net of a checkpoint and load its weights (``weights_only=True``).

    Args:
        path: a ``.pt`` checkpoint written by the train stage.
        device: where to put the network.
    """
    ckpt = load_checkpoint(path)
    network = UNet(**ckpt["model"])
    network.load_state_dict(ckpt["state_dict"])
    network.to(device).eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer", "scaler", "rng")}
    return LoadedModel(network, ckpt["plan"], list(ckpt["patch_size"]), meta)


class Predictor:
    """Segment input images with one or more models (their softmax outputs averaged).

    Each input goes through the models' preprocessing chain; the class
    probabilities are mapped back through the inverse reorientation and
    resampling (linear), then the label map is taken, so the output lies on the
    input's own voxel grid with the input's affine.

    Args:
        models: loaded models sharing one preprocessing plan (e.g. the folds of a run).
        settings: sliding-window settings.
        device: where the networks run.
        series_uid: the DICOM series to read from folders holding several.
    """

    def __init__(
        self, models: Sequence[LoadedModel], settings: EvaluateConfig, device: torch.device,
        series_uid: str | None = None,
    ) -> None:
        self.models = list(models)
        self.plan = self.models[0].plan
        self.settings = settings
        self.device = device
        self.chain = preprocessing(self.plan, with_label=False, series_uid=series_uid)
        self.invert = Invertd(keys="pred", transform=self.chain, orig_keys="image", nearest_interp=False)

    def __call__(self, images: Sequence[str | Path]) -> tuple[np.ndarray, np.ndarray]:
        """Segment one case.

        Args:
            images: one path per channel (NIfTI file or DICOM folder).

        Returns:
            The label map (uint8, the input's spatial shape) and the input's affine (RAS).
        """
        d = self.chain({"image": [str(p) for p in images]})
        image = d["image"]
        probs = None
        for m in self.models:
            p = torch.softmax(predict_logits(m.network, image.as_tensor(), m.patch_size, self.settings, self.device), 0)
            probs = p if probs is None else probs + p
        probs = probs / len(self.models)
        d["pred"] = image.__class__(probs, meta=image.meta, applied_operations=image.applied_operations)
        inverted = self.invert(d)["pred"]
        labels = torch.argmax(inverted, dim=0).numpy().astype(np.uint8)
        affine = np.asarray(image.meta["original_affine"], dtype=np.float64)
        return labels, affine
