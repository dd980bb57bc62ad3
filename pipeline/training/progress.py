"""The training progress line: under a time budget it counts the budget down, not epochs.

A 20-minute run stops at its budget long before ``train.epochs`` (1000 by default), so an
epoch bar would show 4 % done with a 6-hour ETA until the very end. Under a budget the
line reads, e.g.::

    train 12.4/20 min, 7.6 min left | epoch 25 | 9.1 patches/s | loss 0.412 | val Dice 0.871

Without a budget it is the usual bar over epochs, with patches/s, loss and val Dice after it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import IO

from tqdm import tqdm


def budget_line(elapsed_s: float, budget_s: float, epochs: int, patches_per_s: float,
                metrics: dict[str, float]) -> str:
    """The words of the budget line.

    Args:
        elapsed_s: training seconds spent (resumed runs included).
        budget_s: the time budget in seconds.
        epochs: epochs completed so far.
        patches_per_s: training throughput of this run.
        metrics: the last epoch's metrics (``train_loss``; ``val_dice`` when validated).
    """
    spent, total = elapsed_s / 60.0, budget_s / 60.0
    parts = [f"train {spent:.1f}/{total:g} min, {max(0.0, total - spent):.1f} min left", f"epoch {epochs}",
             f"{patches_per_s:.1f} patches/s"]
    if "train_loss" in metrics:
        parts.append(f"loss {metrics['train_loss']:.3f}")
    if "val_dice" in metrics and not math.isnan(metrics["val_dice"]):
        parts.append(f"val Dice {metrics['val_dice']:.3f}")
    return " | ".join(parts)


class TrainingProgress:
    """The progress display of one training run (rank 0 only; silent elsewhere).

    Args:
        start_epoch: epochs already done (a resumed run).
        epochs: ``train.epochs``.
        budget_s: ``train.time_budget_minutes`` in seconds, or ``None``.
        enabled: whether this process shows progress (rank 0).
        clock: seconds of training so far (resumes included), read at each update.
        stream: where the line goes (stderr).
    """

    def __init__(self, start_epoch: int, epochs: int, budget_s: float | None, enabled: bool,
                 clock: Callable[[], float], stream: IO[str] | None = None) -> None:
        self.budget_s, self.clock, self.enabled = budget_s, clock, enabled
        self.start_epoch = start_epoch
        self.stream = stream or sys.stderr
        self.last: dict[str, float] = {}
        self._started = time.monotonic()
        self._patches = 0
        self._bar = None
        if budget_s:
            # Minutes on the bar: its fraction is of the budget, and tqdm's own ETA (which
            # would extrapolate epochs) is left out of the format.
            self._bar = tqdm(total=round(budget_s / 60.0, 2), initial=0, disable=not enabled, file=self.stream,
                             bar_format="{percentage:3.0f}%|{bar:20}| {desc}", dynamic_ncols=False)
        else:
            self._bar = tqdm(total=epochs, initial=start_epoch, desc="train", unit="epoch", disable=not enabled,
                             file=self.stream)

    def epoch_done(self, epoch: int, patches: int, metrics: dict[str, float]) -> None:
        """Show the state after ``epoch`` (0-based) finished.

        Args:
            epoch: the epoch just finished.
            patches: patches trained on in this run so far.
            metrics: its metrics (``train_loss``, ``val_dice`` when validated).
        """
        self.last.update({k: v for k, v in metrics.items() if k in ("train_loss", "val_dice")})
        self._patches = patches
        run_s = time.monotonic() - self._started
        rate = patches / run_s if run_s > 0 else 0.0
        if self.budget_s:
            self._bar.set_description_str(budget_line(self.clock(), self.budget_s, epoch + 1, rate, self.last),
                                          refresh=False)
            self._bar.n = round(min(self.clock(), self.budget_s) / 60.0, 2)
            self._bar.refresh()
        else:
            # The throughput too, as under a budget: a fixed-epoch run is how speed gets compared.
            self._bar.set_postfix({"patches/s": f"{rate:.1f}", **{k: f"{v:.3f}" for k, v in self.last.items()}})
            self._bar.update(1)

    def close(self) -> None:
        """End the display."""
        self._bar.close()
