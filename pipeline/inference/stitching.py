"""The engine's bookkeeping: where one volume's windows go, and the buffers that stitch their outputs.

:class:`TilePlan` lays the windows out (padding, and the tiles each group of mirror flips
shares); :class:`Accumulator` blends window outputs into the volume-sized buffers in place,
normalises each group of flips and adds the groups up, optionally keeping the spread of
the passes; :class:`DeviceBudget` accounts device allocations against a cap on the CPU, so
the out-of-memory fallbacks can be tested without a GPU.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch


def class_argmax(probabilities: torch.Tensor) -> torch.Tensor:
    """The label map of class scores: the class axis's argmax as uint8 (ties to the lower class, as ``argmax``).

    ``argmax`` over the leading axis of a ``(classes, X, Y, Z)`` tensor is a strided reduction:
    9.5 s on 2 cores for a whole CT on the network's grid, and int64 (0.4 GB at once), where
    a running comparison of the classes, a slab at a time, takes a tenth of a second a class.

    Args:
        probabilities: ``(classes, *spatial)`` probabilities or logits (at most 256 classes); the map is made on
            their device.
    """
    spatial = probabilities.shape[1:]
    out = torch.zeros(spatial, dtype=torch.uint8, device=probabilities.device)
    step = max(1, (1 << 22) // max(1, int(np.prod(spatial[1:]))))
    for start in range(0, spatial[0], step):
        block, labels = probabilities[:, start:start + step], out[start:start + step]
        best = block[0].clone()
        for c in range(1, block.shape[0]):
            better = block[c] > best
            labels[better] = c
            torch.maximum(best, block[c], out=best)
    return out


class SimulatedOutOfMemory(torch.OutOfMemoryError):
    """Raised by the CPU-side memory-cap simulation where CUDA would run out of memory."""


class DeviceBudget:
    """Accounts the engine's allocations on the compute device against a cap (CPU simulation)."""

    def __init__(self, cap_bytes: int | None) -> None:
        self.cap, self.used = cap_bytes, 0

    def take(self, nbytes: int, what: str) -> None:
        if self.cap is not None and self.used + nbytes > self.cap:
            raise SimulatedOutOfMemory(
                f"{what} needs {nbytes / 2**20:.0f} MiB, {self.cap / 2**20:.0f} MiB cap, "
                f"{self.used / 2**20:.0f} MiB in use"
            )
        self.used += nbytes


#: one window to evaluate: its start in the padded buffer per axis, and the axes it is flipped along.
Job = tuple[tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class TilePlan:
    """Where one volume's windows go: the padding, and the tiles each group of flips shares.

    Coordinates are those of the padded buffer: the volume with ``margin`` zeros on both sides of each axis.
    """

    size: list[int]
    window: list[int]
    margin: list[int]
    #: window starts per axis -> the flips that see exactly those tiles (one normalisation per group).
    groups: dict[tuple, list[tuple[int, ...]]]

    @property
    def jobs_total(self) -> int:
        return sum(math.prod(len(a) for a in key) * len(flips) for key, flips in self.groups.items())

    def jobs(self, key: tuple, flips: list[tuple[int, ...]]) -> list[Job]:
        return [(pos, flip) for pos in itertools.product(*key) for flip in flips]

    def tile(self, pos: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(slice(p, p + w) for p, w in zip(pos, self.window))

    def crop(self) -> tuple[slice, ...]:
        return tuple(slice(m, m + n) for m, n in zip(self.margin, self.size))


class Accumulator:
    """Blended windows summed in place, normalised per group of flips, the groups added up.

    The buffers are allocated at the first batch (its outputs give the number of classes) and reused by every group.
    """

    def __init__(
        self, plan: TilePlan, buffer: list[int], weight_map: torch.Tensor, device: torch.device,
        budget: DeviceBudget | None, spread: bool = False, groups: int | None = None,
    ) -> None:
        self.plan, self.buffer, self.weight_map, self.device, self.budget = plan, buffer, weight_map, device, budget
        # How many groups will be normalised and added (one per flip when each pass's own mask is wanted): with one,
        # the buffer is the result; with several, a second copy on the CPU adds them up.
        self.groups = len(plan.groups) if groups is None else groups
        self.dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.acc: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        # The spread of the passes costs one single-channel buffer: the blended mean of each pass's squared
        # logit norm, from which the variance around the mean logits follows exactly (E[|l|^2] - |E[l]|^2).
        self.spread = spread
        self.squares: torch.Tensor | None = None
        self.total_squares: torch.Tensor | None = None

    def start_group(self) -> None:
        if self.acc is not None:
            self.acc.zero_()
            self.weights.zero_()
            if self.squares is not None:
                self.squares.zero_()

    def add(self, pred: torch.Tensor, chunk: list[Job], first_flip: tuple[int, ...]) -> None:
        """Blend a batch of window outputs in; each tile's weights count once per group (for ``first_flip``)."""
        if self.acc is None:
            self._allocate(pred.shape[1])
        pred = pred.to(self.dtype)
        for i, (pos, flip) in enumerate(chunk):
            sl = self.plan.tile(pos)
            out = torch.flip(pred[i], [d + 1 for d in flip]) if flip else pred[i]
            self.acc[(slice(None), *sl)].addcmul_(out.to(self.device), self.blend)
            if self.squares is not None:
                self.squares[sl].addcmul_(out.float().square().sum(0).to(self.device), self.blend_f32)
            if flip == first_flip:
                self.weights[sl] += self.blend_f32

    def _allocate(self, out_channels: int) -> None:
        if self.budget is not None:
            self.budget.take(out_channels * math.prod(self.buffer) * (2 if self.dtype == torch.float16 else 4),
                             "the stitched logits")
            self.budget.take(math.prod(self.buffer) * 4, "the stitched weights")
        self.acc = torch.zeros((out_channels, *self.buffer), dtype=self.dtype, device=self.device)
        self.weights = torch.zeros(self.buffer, dtype=torch.float32, device=self.device)
        if self.spread:
            if self.budget is not None:
                self.budget.take(math.prod(self.buffer) * 4, "the spread of the passes")
            self.squares = torch.zeros(self.buffer, dtype=torch.float32, device=self.device)
        self.blend_f32 = self.weight_map.to(self.device)
        self.blend = self.blend_f32.to(self.dtype)

    def end_group(self) -> torch.Tensor:
        """Normalise the group's blended sum and add it to the total.

        Returns:
            The group's normalised logits on the padded buffer (valid until the next group starts).
        """
        # In place: for a CT-sized volume each extra copy of the logits is hundreds of MB.
        part = self.acc if self.acc.dtype == torch.float32 else self.acc.float()
        part.div_(self.weights)
        if self.groups == 1:
            self.total = part
        elif self.total is None:
            self.total = part.to("cpu", copy=True)  # acc is reused by the next group
        else:
            self.total += part.to("cpu")
        if self.squares is not None:
            self.squares.div_(self.weights)
            if self.groups == 1:
                self.total_squares = self.squares
            elif self.total_squares is None:
                self.total_squares = self.squares.to("cpu", copy=True)
            else:
                self.total_squares += self.squares.to("cpu")
        return part

    def result(self, flips: int) -> torch.Tensor:
        """The mean over the ``flips`` flips, cropped to the volume: float32 on the CPU."""
        total = self.total
        assert total is not None
        total /= flips
        return total[(slice(None), *self.plan.crop())].float().cpu().contiguous()

    def mean_squares(self, flips: int) -> torch.Tensor | None:
        """The mean over passes of the squared logit norm, cropped to the volume (``None`` without ``spread``)."""
        if self.total_squares is None:
            return None
        self.total_squares /= flips
        return self.total_squares[self.plan.crop()].cpu().contiguous()
