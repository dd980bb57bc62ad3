"""Validation during training: mean Dice per label by sliding window in the plan's voxel space, fitted into the time budget.

Under ``train.time_budget_minutes`` the in-training validation passes are planned into the budget
(:class:`ValidationBudget`): before the first step one validation case is timed, which gives the
cost of a window; from it and the number of windows each case needs, every pass's cost is known
before it runs. At first only the last pass is planned, so that an epoch longer than the budget
still ends in time; once an epoch's length is known, the passes between are planned too. All
passes together may take :data:`VALIDATION_SHARE` of the budget. A dataset whose passes fit keeps
them as configured (hippocampus: 42 small cases every 10 epochs, about 8 s a pass); a larger one
gets, in turn, windows without overlap, a fixed subset of the cases (at least :data:`MIN_CASES`),
then fewer passes. Training stops early enough for the last pass to end within :data:`GRACE_S`
of the budget. The final evaluation after training is separate and unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.unet import UNet
from pipeline.config import PipelineConfig
from pipeline.evaluation import dice_per_label
from pipeline.inference import (
    SlidingWindowInferer,
    WindowSettings,
    class_argmax,
    tile_starts,
    window_size,
)

#: The share of a time budget that in-training validation may take, every pass together.
VALIDATION_SHARE = 0.1
#: A pass on fewer cases says little: below this the passes become fewer instead.
MIN_CASES = 5
#: A last pass that ends within this many seconds of the budget needs no time kept back for it.
GRACE_S = 30.0
#: Kept back for the last pass beyond its estimate (the estimate is one case's timing).
ESTIMATE_MARGIN = 1.25


def validate(
    network: UNet, cases: Sequence[dict[str, torch.Tensor]], cfg: PipelineConfig, patch_size: Sequence[int],
    labels: Sequence[int], device: torch.device, overlap: float | None = None,
) -> dict[int, float]:
    """Mean Dice per label over the validation cases, by sliding window in the plan's voxel space.

    Args:
        network: the network (put in evaluation mode here).
        cases: preprocessed ``image``/``label`` tensors.
        cfg: the pipeline configuration (window settings).
        patch_size: the training patch size (window size).
        labels: foreground label values.
        device: where the network runs.
        overlap: the windows' overlap; ``None``: ``evaluate.overlap``.
    """
    network.eval()
    e = cfg.evaluate
    # Mirroring multiplies the cost by 4 (2D) or 8 (3D): keep it for the final evaluation. Weights change
    # between validations, so compiling (which freezes them) would recompile every time.
    settings = WindowSettings(overlap=e.overlap if overlap is None else overlap, mode=e.mode, mirror=False,
                              batch_size=e.sw_batch_size, compile="off")
    inferer = SlidingWindowInferer(network, patch_size, settings, device)
    scores: dict[int, list[float]] = {v: [] for v in labels}
    for case in cases:
        logits = inferer(case["image"])
        pred = class_argmax(logits).numpy()
        for v, d in dice_per_label(pred, case["label"][0].numpy(), labels).items():
            scores[v].append(d)
    return {v: float(np.nanmean(s)) if not all(np.isnan(s)) else 0.0 for v, s in scores.items()}


def windows_per_case(shape: Sequence[int], window: Sequence[int], overlap: float) -> int:
    """How many windows the engine runs (without mirroring) over a volume of ``shape``.

    Args:
        shape: the volume's spatial shape.
        window: the 3D window (:func:`pipeline.inference.window_size`).
        overlap: the windows' overlap.
    """
    return math.prod(len(tile_starts(max(n, w), w, overlap)) for n, w in zip(shape, window))


@dataclass(frozen=True)
class ValidationPlan:
    """What each in-training validation pass runs.

    Args:
        cases: indices of the validation cases scored (the same ones every pass, so passes compare).
        overlap: the windows' overlap.
        every: epochs between passes (the last epoch always validates).
        pass_s: the estimated seconds of one pass.
    """

    cases: tuple[int, ...]
    overlap: float
    every: int
    pass_s: float


class ValidationBudget:
    """Plans the in-training validation passes into the time budget (see the module docstring).

    Without a budget nothing changes: every case, ``evaluate.overlap``, every ``val_every`` epochs.

    Args:
        shapes: the validation cases' spatial shapes.
        patch_size: the training patch size.
        spatial_dims: the network's spatial dimensions.
        overlap: ``evaluate.overlap``.
        every: ``train.val_every``.
        budget_s: the time budget in seconds; ``None``: none.
    """

    def __init__(self, shapes: Sequence[Sequence[int]], patch_size: Sequence[int], spatial_dims: int, overlap: float,
                 every: int, budget_s: float | None) -> None:
        self.shapes = [list(s) for s in shapes]
        self.window = window_size(patch_size, spatial_dims)
        self.budget_s = budget_s
        self.spent_s = 0.0
        self.seconds_per_window: float | None = None
        self.plan = ValidationPlan(tuple(range(len(self.shapes))), overlap, max(1, every), 0.0)
        self._overlap, self._every, self._replanned = overlap, max(1, every), False

    @property
    def needs_calibration(self) -> bool:
        """Under a budget, before the cost of a window is known."""
        return self.budget_s is not None and self.seconds_per_window is None and bool(self.shapes)

    def calibration_case(self) -> int:
        """The case to time once (the smallest: the cheapest measurement)."""
        return int(np.argmin([math.prod(s) for s in self.shapes]))

    def windows(self, cases: Sequence[int], overlap: float) -> int:
        """Windows one pass over ``cases`` runs.

        Args:
            cases: case indices.
            overlap: the windows' overlap.
        """
        return sum(windows_per_case(self.shapes[i], self.window, overlap) for i in cases)

    def calibrate(self, seconds: float, overlap: float) -> ValidationPlan:
        """Plan the last pass from one timed case (the passes between wait for :meth:`replan`).

        Args:
            seconds: what validating :meth:`calibration_case` took.
            overlap: the overlap it ran with.
        """
        self.seconds_per_window = seconds / max(1, self.windows([self.calibration_case()], overlap))
        self.spent_s += seconds
        self.plan = self._fit(1)
        return self.plan

    @property
    def needs_replan(self) -> bool:
        """Calibrated, but the passes between are not planned yet."""
        return self.seconds_per_window is not None and not self._replanned

    def replan(self, epoch_s: float, elapsed_s: float) -> ValidationPlan:
        """Plan every pass, once the length of an epoch is known.

        Args:
            epoch_s: the seconds of one training epoch.
            elapsed_s: the budget already spent.
        """
        assert self.budget_s is not None
        self._replanned = True
        # The passes left as configured: the intermediate ones and the last.
        passes = math.floor(max(0.0, self.budget_s - elapsed_s) / max(epoch_s * self._every, 1e-9)) + 1
        self.plan = self._fit(passes)
        return self.plan

    def _cost(self, cases: Sequence[int], overlap: float) -> float:
        assert self.seconds_per_window is not None
        return self.seconds_per_window * self.windows(cases, overlap)

    def _fit(self, passes: int) -> ValidationPlan:
        """The cheapest change to the configured passes that lets ``passes`` of them fit the allowance."""
        assert self.budget_s is not None
        allowance = VALIDATION_SHARE * self.budget_s
        every, n = self._every, len(self.shapes)
        everything = tuple(range(n))
        for overlap in dict.fromkeys((self._overlap, 0.0)):
            cost = self._cost(everything, overlap)
            if passes * cost <= allowance:
                return ValidationPlan(everything, overlap, every, cost)
        per_case = self._cost(everything, 0.0) / n
        k = min(n, math.floor(allowance / (passes * per_case)))
        if k < min(MIN_CASES, n):
            # Fewer passes of a useful size instead: stretch the interval over the epochs left.
            k = min(n, max(1, min(MIN_CASES, math.floor(allowance / per_case))))
            fit = max(1, math.floor(allowance / (k * per_case)))
            if passes > 1:
                every = max(every, math.ceil(every * (passes - 1) / (fit - 1))) if fit > 1 else 10**9
        cases = tuple(sorted({int(round(i)) for i in np.linspace(0, n - 1, k)}))
        return ValidationPlan(cases, 0.0, every, self._cost(cases, 0.0))

    def reserve_s(self) -> float:
        """Seconds kept back at the end of training for the last pass (what it may run past the budget is the grace)."""
        if self.budget_s is None or self.seconds_per_window is None:
            return 0.0
        return max(0.0, ESTIMATE_MARGIN * self.plan.pass_s - GRACE_S)

    def due(self, epoch: int, last: bool) -> bool:
        """Whether to validate after ``epoch`` (0-based).

        An intermediate pass is skipped when it would leave too little of the allowance for the last one.

        Args:
            epoch: the epoch just trained.
            last: it is the last one (the last always validates).
        """
        if last:
            return True
        if (epoch + 1) % self.plan.every:
            return False
        if self.budget_s is None or self.seconds_per_window is None:
            return True
        return self.spent_s + 2 * self.plan.pass_s <= VALIDATION_SHARE * self.budget_s

    def record(self, seconds: float) -> None:
        """Account a pass that ran with :attr:`plan` (its timing refines the cost of a window).

        Args:
            seconds: what it took.
        """
        self.spent_s += seconds
        if self.budget_s is not None and self.seconds_per_window is not None:
            windows = self.windows(self.plan.cases, self.plan.overlap)
            self.seconds_per_window = seconds / max(1, windows)
            self.plan = ValidationPlan(self.plan.cases, self.plan.overlap, self.plan.every,
                                       self._cost(self.plan.cases, self.plan.overlap))
