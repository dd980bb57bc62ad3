"""The training progress line: under a time budget it counts minutes down, not epochs of ``train.epochs``."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.training.progress import TrainingProgress, budget_line


def test_budget_line_says_minutes_spent_and_left_epochs_rate_and_dice() -> None:
    line = budget_line(744.0, 1200.0, 25, 9.14, {"train_loss": 0.4123, "val_dice": 0.8712})
    assert line == "train 12.4/20 min, 7.6 min left | epoch 25 | 9.1 patches/s | loss 0.412 | val Dice 0.871"
    assert "0.0 min left" in budget_line(1300.0, 1200.0, 60, 9.0, {})  # past the budget (the last epoch): never negative


def test_a_budgeted_bar_counts_the_budget_down_and_keeps_the_last_validation() -> None:
    clock = iter([300.0, 300.0, 600.0, 600.0])
    out = io.StringIO()
    bar = TrainingProgress(0, 1000, 1200.0, True, lambda: next(clock), out)
    bar.epoch_done(9, 400, {"train_loss": 0.5, "val_dice": 0.8})
    bar.epoch_done(19, 800, {"train_loss": 0.4})  # no validation this epoch: the last Dice stays shown
    bar.close()
    text = out.getvalue().replace("\r", "\n")
    last = [line for line in text.splitlines() if line.strip()][-1]
    assert "train 10.0/20 min, 10.0 min left" in last and "epoch 20" in last
    assert "loss 0.400" in last and "val Dice 0.800" in last
    assert " 50%" in last  # the bar's fraction is of the budget (10 of 20 minutes), not of 1000 epochs
    assert "/1000" not in text and "epoch/s" not in text


def test_without_a_budget_the_bar_counts_epochs() -> None:
    out = io.StringIO()
    bar = TrainingProgress(3, 10, None, True, lambda: 0.0, out)
    bar._started -= 2.0  # two seconds of training for the 8 patches
    bar.epoch_done(3, 8, {"train_loss": 0.5})
    bar.close()
    assert "4/10" in out.getvalue() and "min left" not in out.getvalue()
    assert re.search(r"patches/s=(\d+\.\d)", out.getvalue()), out.getvalue()
    rate = float(re.search(r"patches/s=(\d+\.\d)", out.getvalue()).group(1))
    assert 3.0 <= rate <= 4.0, out.getvalue()  # 8 patches over a little more than 2 s


def test_a_budgeted_training_shows_minutes_left(tiny_config: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    """Wired into the loop: a real (tiny) training under a budget prints the countdown, not 1000 epochs."""
    from pipeline.stages import prepare
    from pipeline.training import train

    cfg = load_config(tiny_config, ["train.epochs=1000", "train.time_budget_minutes=0.05", "train.val_every=1"])
    prepared = prepare(cfg, tmp_path / "w")
    result = train(cfg, prepared.plan, prepared.subset("train"), prepared.subset("val"), tmp_path / "ckpt")
    assert result.stopped_by_budget and result.epochs < 1000
    err = capsys.readouterr().err.replace("\r", "\n")
    lines = [line for line in err.splitlines() if "min left" in line]
    assert lines, err[-2000:]
    m = re.search(r"train ([\d.]+)/0\.05 min, ([\d.]+) min left \| epoch (\d+) \|", lines[-1])
    assert m and int(m.group(3)) == result.epochs
    assert "val Dice" in lines[-1] and "/1000" not in err
