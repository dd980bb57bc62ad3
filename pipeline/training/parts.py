"""The network and what trains it: the U-Net, the loss, the optimiser, the AMP scaler and the weight average.

One training step is three phases (:meth:`TrainParts.forward_loss`, :meth:`~TrainParts.backward`,
:meth:`~TrainParts.step`), so the loop, the profile script and the tests run the same step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from monai.losses import DiceCELoss
from torch.nn.parallel import DistributedDataParallel

from models.unet import UNet
from pipeline.config import TrainConfig
from pipeline.training.devices import autocast_dtype
from pipeline.training.ema import WeightAverage
from pipeline.training.loss import DeepSupervisionLoss


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The network itself, out of its DistributedDataParallel wrapper when it has one.

    Args:
        network: the network, wrapped or not.
    """
    return network.module if isinstance(network, DistributedDataParallel) else network


@dataclass
class TrainParts:
    """The network and what trains it, with the three phases of one training step.

    Args:
        network: the U-Net (wrapped in DistributedDataParallel under torchrun).
        loss_fn: the deep-supervision loss.
        optimizer: the optimiser.
        scaler: the AMP gradient scaler (inactive off CUDA).
        amp_dtype: what the forward pass autocasts to: float16 on CUDA (with the scaler), bfloat16 on a
            CPU with a native bf16 dot product (see ``autocast_dtype``); ``None``: float32, no autocast.
        ema: the weight average (``train.ema_decay``): what is validated and exported.
    """

    network: torch.nn.Module
    loss_fn: DeepSupervisionLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    ema: WeightAverage | None = None
    nonfinite_grads: list[str] = field(default_factory=list)  # of the last step skipped for its gradients

    @property
    def precision(self) -> str:
        """The forward pass's precision, as the run's ``train.precision`` tag names it."""
        return str(self.amp_dtype or torch.float32).removeprefix("torch.")

    def exported(self) -> torch.nn.Module:
        """The network that validation scores and checkpoints export: the weight average when there is one."""
        return self.ema.module if self.ema is not None else unwrap(self.network)

    def forward_loss(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Zero the gradients, run the network and return the loss.

        Args:
            image: a batch of patches on the network's device.
            label: their labels.
        """
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(image.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            outputs = self.network(image)
        # The softmax, the Dice sums over a whole patch and the cross-entropy in float32, as CUDA autocast keeps
        # them: bfloat16's 8-bit mantissa cannot hold a sum of 10^5 probabilities to better than a few percent.
        return self.loss_fn(_float32(outputs), label)

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate the (scaled) loss.

        Args:
            loss: what :meth:`forward_loss` returned.
        """
        self.scaler.scale(loss).backward()

    def step(self) -> bool:
        """Clip the gradients, step the optimiser and fold the new weights into the average.

        Returns:
            Whether the step was taken: ``False`` when the gradient norm is not finite (the weights, the
            optimiser state and the average stay as they were). Under float16 the scaler decides that
            itself and lowers its scale, as it is meant to: those steps count as taken.
        """
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.network.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if not self.scaler.is_enabled() and not bool(torch.isfinite(norm)):
            # Named before the gradients are dropped (clipping by a NaN norm would spread the NaN to all).
            self.nonfinite_grads = [n for n, p in unwrap(self.network).named_parameters()
                                    if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
            self.optimizer.zero_grad(set_to_none=True)
            return False
        torch.nn.utils.clip_grads_with_norm_(params, 12.0, norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(unwrap(self.network))
        return True


def _float32(outputs: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """The network's logits (one tensor, or one per deep-supervision level) as float32."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float()
    return [o.float() for o in outputs]


def build_parts(t: TrainConfig, kwargs: dict[str, Any], device: torch.device) -> TrainParts:
    """The U-Net, the loss, the optimiser, the AMP scaler and the weight average of a training config.

    Args:
        t: the ``train`` section.
        kwargs: the U-Net's constructor arguments (:func:`model_kwargs`).
        device: where it trains.
    """
    network: torch.nn.Module = UNet(**kwargs).to(device)
    loss_fn = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True, batch=True))
    if t.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            network.parameters(), lr=t.learning_rate, momentum=0.99, nesterov=True, weight_decay=t.weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(network.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    amp_dtype = autocast_dtype(device, t.amp)
    # Gradient scaling guards float16's narrow range; bfloat16 has float32's.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = WeightAverage(network, t.ema_decay) if t.ema_decay else None
    return TrainParts(network, loss_fn, optimizer, scaler, amp_dtype, ema)
