"""Validation during training: mean Dice per label by sliding window in the plan's voxel space.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from models.unet import UNet
from pipeline.config import PipelineConfig
from pipeline.evaluation import dice_per_label
from pipeline.inference import (
    SlidingWindowInferer,
    WindowSettings,
)


def validate(
    network: UNet, cases: Sequence[dict[str, torch.Tensor]], cfg: PipelineConfig, patch_size: Sequence[int],
    labels: Sequence[int], device: torch.device,
) -> dict[int, float]:
    """Mean Dice per label over the validation cases, by sliding window in the plan's voxel space.

    Args:
        network: the network (put in evaluation mode here).
        cases: preprocessed ``image``/``label`` tensors.
        cfg: the pipeline configuration (window settings).
        patch_size: the training patch size (window size).
        labels: foreground label values.
        device: where the network runs.
    """
    network.eval()
    e = cfg.evaluate
    # Mirroring multiplies the cost by 4 (2D) or 8 (3D): keep it for the final evaluation. Weights change
    # between validations, so compiling (which freezes them) would recompile every time.
    settings = WindowSettings(overlap=e.overlap, mode=e.mode, mirror=False, batch_size=e.sw_batch_size, compile="off")
    inferer = SlidingWindowInferer(network, patch_size, settings, device)
    scores: dict[int, list[float]] = {v: [] for v in labels}
    for case in cases:
        logits = inferer(case["image"])
        pred = torch.argmax(logits, 0).numpy()
        for v, d in dice_per_label(pred, case["label"][0].numpy(), labels).items():
            scores[v].append(d)
    return {v: float(np.nanmean(s)) if not all(np.isnan(s)) else 0.0 for v, s in scores.items()}
