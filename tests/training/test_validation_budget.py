"""The time budget holds for every task: in-training validation is planned into it.

Found on hn_ct (23 validation cases of 128^3): each pass took about 6 minutes on the CPU and a
20-minute budget ended at 31.8 minutes. The training here runs on a clock the test controls
(40 s per optimiser step, 20 s per validation window), so the check is exact and never measures
this machine's speed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.training.validation import GRACE_S, VALIDATION_SHARE, ValidationBudget, windows_per_case

BUDGET_S = 20 * 60.0


def test_small_cases_validate_as_configured() -> None:
    """Hippocampus-like: 42 cases of about 36x50x35 at 32x48x32, ~8 s a pass, every 10 epochs of ~70 s."""
    budget = ValidationBudget([(36, 50, 35)] * 42, [32, 48, 32], 3, 0.5, 10, BUDGET_S)
    assert budget.needs_calibration
    per_window = 8.0 / budget.windows(range(42), 0.5)
    budget.calibrate(per_window * windows_per_case((36, 50, 35), budget.window, 0.0), 0.0)
    plan = budget.replan(70.0, 70.0)
    assert (len(plan.cases), plan.overlap, plan.every) == (42, 0.5, 10)
    assert plan.pass_s == pytest.approx(8.0)
    assert budget.reserve_s() == 0.0  # the last pass ends within the grace: training keeps its whole budget
    assert budget.due(9, last=False) and not budget.due(10, last=False)


def test_large_cases_get_cheaper_passes_within_the_share() -> None:
    """hn_ct-like: 23 cases of 128^3 at 64^3 windows, 15.6 s a case at overlap 0.5 (27 windows), epochs of 100 s."""
    budget = ValidationBudget([(128, 128, 128)] * 23, [64, 64, 64], 3, 0.5, 10, BUDGET_S)
    per_window = 15.6 / 27
    # Before the first epoch: only the last pass is planned, all 23 cases without overlap (about 110 s).
    first = budget.calibrate(per_window * 8, 0.0)
    assert (len(first.cases), first.overlap) == (23, 0.0)
    assert first.pass_s <= VALIDATION_SHARE * BUDGET_S
    plan = budget.replan(100.0, 100.0)
    passes = 2  # at epoch 10 and the last, as configured
    assert plan.overlap == 0.0
    assert passes * plan.pass_s <= VALIDATION_SHARE * BUDGET_S
    assert 5 <= len(plan.cases) < 23 and plan.every == 10
    # Training stops early enough for the last pass to end within the grace.
    assert BUDGET_S - budget.reserve_s() + plan.pass_s <= BUDGET_S + GRACE_S


def test_no_budget_changes_nothing() -> None:
    budget = ValidationBudget([(128, 128, 128)] * 23, [64, 64, 64], 3, 0.5, 10, None)
    assert not budget.needs_calibration and budget.reserve_s() == 0.0
    assert budget.due(9, last=False) and budget.plan.cases == tuple(range(23)) and budget.plan.overlap == 0.5


@pytest.mark.parametrize(("step_s", "iterations"), [(40.0, 4), (100.0, 20)])
def test_training_and_validation_end_within_a_minute_of_the_budget(tiny_config: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch, step_s: float,
                                                                 iterations: int) -> None:
    """Tiny data whose validation is, by the clock, dear: without the plan the run ends minutes late.

    With 20 steps of 100 s the first epoch outlasts the budget (as on hn_ct on a CPU): the last pass must be
    planned before it ends.
    """
    from pipeline.inference import SlidingWindowInferer
    from pipeline.stages import prepare
    from pipeline.training import loop, train

    now = [0.0]
    monkeypatch.setattr(loop, "_clock", lambda: now[0])
    step, infer = loop.TrainParts.step, SlidingWindowInferer.__call__

    def timed_step(self: loop.TrainParts) -> bool:
        taken = step(self)
        now[0] += step_s
        return taken

    def timed_infer(self: SlidingWindowInferer, image):  # noqa: ANN001, ANN202
        out = infer(self, image)
        now[0] += 20.0 * self.windows_evaluated
        return out

    monkeypatch.setattr(loop.TrainParts, "step", timed_step)
    monkeypatch.setattr(SlidingWindowInferer, "__call__", timed_infer)
    cfg = load_config(tiny_config, ["train.epochs=1000", "train.time_budget_minutes=20",
                                    f"train.iterations_per_epoch={iterations}"])
    prepared = prepare(cfg, tmp_path / "w")
    validated = []
    result = train(cfg, prepared.plan, prepared.subset("train"), prepared.subset("val"), tmp_path / "ckpt",
                   log_metrics=lambda metrics, epoch: validated.append(epoch) if "val_dice" in metrics else None)
    assert result.stopped_by_budget
    assert validated and validated[-1] == result.epochs  # the last epoch validated
    assert BUDGET_S <= now[0] <= BUDGET_S + 60.0
