"""Dice + cross-entropy with deep supervision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


class DeepSupervisionLoss(torch.nn.Module):
    """Dice + cross-entropy, summed over deep-supervision outputs with weights halving per level.

    Args:
        loss: the per-output loss.
    """

    def __init__(self, loss: torch.nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, label)
        weights = [0.5**i for i in range(len(outputs))]
        total = 0.0
        for w, out in zip(weights, outputs):
            target = label if out.shape[2:] == label.shape[2:] else F.interpolate(
                label.float(), size=out.shape[2:], mode="nearest"
            )
            total = total + w * self.loss(out, target)
        return total / sum(weights)
