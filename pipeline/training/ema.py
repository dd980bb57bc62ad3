"""An exponential moving average of the weights, for validation and export (``train.ema_decay``).

A short budget ends while the learning rate is still high, so the last weights carry the
noise of the last few steps; their running average usually segments better. Weights and
normalisation buffers are both averaged (torch's ``AveragedModel`` with ``use_buffers``),
so the averaged network can be validated and exported as it is.

The average lives beside the raw network: training steps the raw one, the average
follows after every optimiser step, and ``last.pt`` stores both, so a resumed run
continues the very same average.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class WeightAverage:
    """The moving average of a network's parameters and buffers.

    After each :meth:`update`, every averaged tensor ``a`` becomes
    ``decay * a + (1 - decay) * w`` for the network's current ``w``; the first update
    copies ``w``.

    Args:
        network: the network being trained (not wrapped in DDP).
        decay: the weight of the past per step, in (0, 1).
    """

    def __init__(self, network: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.averaged = AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.averaged.eval()

    @torch.no_grad()
    def update(self, network: torch.nn.Module) -> None:
        """Fold the network's current weights into the average.

        Args:
            network: the network being trained (the same architecture).
        """
        self.averaged.update_parameters(network)

    @property
    def module(self) -> torch.nn.Module:
        """The averaged network, in evaluation mode (validate and export this)."""
        return self.averaged.module

    def state_dict(self) -> dict[str, Any]:
        """The average and its step count, for ``last.pt``."""
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue an average saved by :meth:`state_dict`.

        Args:
            state: what :meth:`state_dict` returned.
        """
        self.averaged.load_state_dict(state)
