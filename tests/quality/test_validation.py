"""The statistics that say what a quality estimate is worth, the reliable rule, and the controls against
fooling ourselves: a random estimate is not reliable, and a fit scored on its own cases is refused."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.quality import fit_calibration
from pipeline.quality.calibration import Calibration
from pipeline.quality.validation import (
    aurc,
    check_disjoint,
    cross_fit,
    per_structure,
    random_aurc,
    reliable,
    risk_coverage,
    spearman,
    spearman_interval,
    summarise,
    worst_caught,
)


def test_the_interval_covers_the_true_rank_correlation_and_excludes_zero() -> None:
    # A bivariate normal with correlation r has a population Spearman rho of (6 / pi) asin(r / 2).
    r, n = 0.8, 60
    truth = 6 / math.pi * math.asin(r / 2)
    rng = np.random.default_rng(11)
    x = rng.normal(size=n)
    y = r * x + math.sqrt(1 - r * r) * rng.normal(size=n)
    interval = spearman_interval(x, np.exp(y))  # a monotone transform changes no rank
    assert interval.low < truth < interval.high
    assert interval.low > 0 and interval.n == n
    assert interval.value == pytest.approx(spearman(x, y))
    assert spearman_interval(x, y) == interval  # fixed seed: the same cases give the same interval


def test_aurc_orders_perfect_random_and_reversed() -> None:
    rng = np.random.default_rng(2)
    dice = rng.beta(8, 2, size=50)
    perfect, reversed_ = aurc(dice, dice), aurc(-dice, dice)
    shuffled = [aurc(rng.permutation(dice), dice) for _ in range(400)]
    assert perfect < random_aurc(dice) < reversed_
    assert np.mean(shuffled) == pytest.approx(random_aurc(dice), abs=0.003)  # random's expectation is mean(1 - Dice)
    assert aurc(np.full(50, 0.7), dice) == pytest.approx(random_aurc(dice))  # a constant ranks nothing: ties averaged
    coverage, risk = risk_coverage(dice, dice)
    assert coverage[-1] == 1.0 and risk[-1] == pytest.approx(random_aurc(dice)) and np.all(np.diff(risk) >= -1e-12)


def _realistic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hippocampus-like cases: true mean Dice mostly 0.8-0.9 with a tail of poor ones, and an agreement that
    follows it with noise (as members' masks overlap less where the model is wrong)."""
    rng = np.random.default_rng(seed)
    dice = np.clip(rng.beta(18, 3, size=n) - (rng.random(n) < 0.1) * rng.uniform(0.2, 0.5, n), 0, 1)
    agreement = np.clip(0.5 + 0.5 * dice + rng.normal(0, 0.03, n), 0, 1)
    return agreement, dice


def test_control_a_random_estimate_is_not_reliable() -> None:
    agreement, dice = _realistic(42, seed=4)
    ok, why = reliable(summarise(agreement, dice))
    assert ok and not why
    for seed in range(5):
        noise = np.random.default_rng(100 + seed).random(dice.size)
        ok, why = reliable(summarise(noise, dice))
        assert not ok and any("interval" in w for w in why)


def test_reliable_needs_both_the_interval_and_the_aurc() -> None:
    assert reliable({"spearman_low": 0.45, "aurc": 0.10, "aurc_random": 0.15}) == (True, [])
    ok, why = reliable({"spearman_low": 0.25, "aurc": 0.10, "aurc_random": 0.15})
    assert not ok and len(why) == 1 and "0.25" in why[0]
    ok, why = reliable({"spearman_low": 0.45, "aurc": 0.16, "aurc_random": 0.15})
    assert not ok and "AURC" in why[0]
    assert not reliable({"spearman_low": math.nan, "aurc": 0.1, "aurc_random": 0.2})[0]


def test_summary_screening_and_reference() -> None:
    agreement, dice = _realistic(40, seed=5)
    flagged = agreement < np.quantile(agreement, 0.2)
    s = summarise(agreement, dice, flagged=flagged, reference=np.full(40, 0.8))
    assert s["flagged_share"] == pytest.approx(flagged.mean())
    assert s["worst_caught"] == worst_caught(flagged, dice) and s["worst"] == 5
    assert s["aurc_optimal"] <= s["aurc"] < s["aurc_reference"] == pytest.approx(s["aurc_random"])
    per = per_structure({"a": agreement, "b": agreement[::-1]}, {"a": dice, "b": dice})
    assert per["a"].value > 0.5 > per["b"].value


def test_control_a_fit_scored_on_its_own_cases_is_refused() -> None:
    with pytest.raises(ValueError, match="saw them"):
        check_disjoint(["a", "b", "c"], ["c", "d"])
    check_disjoint(["a", "b"], ["c"])
    # The same case in two groups (two split seeds pooled as folds) would be fitted on and scored.
    with pytest.raises(ValueError, match="case_3"):
        cross_fit([0, 0, 1, 1], lambda rest: rest, lambda model, held: [0.0] * len(held),
                  case_ids=["case_1", "case_3", "case_2", "case_3"])


def test_control_choosing_a_signal_on_the_scored_cases_is_visibly_optimistic() -> None:
    # 40 cases, 60 candidate signals of pure noise: the best of them on the very cases it is scored on looks like a
    # signal; chosen on the other folds and scored on the held-out fold, it is what it is, noise.
    rng = np.random.default_rng(7)
    n, k = 40, 60
    dice = rng.beta(8, 2, size=n)
    candidates = rng.random((k, n))

    def best(rows: list[int]) -> int:
        return int(np.argmax([spearman(c[rows], dice[rows]) for c in candidates]))

    in_sample = spearman(candidates[best(list(range(n)))], dice)
    folds = [i % 5 for i in range(n)]
    held_out = cross_fit(folds, best, lambda chosen, rows: [candidates[chosen][i] for i in rows])
    # Each fold's values come from a different chosen signal: rank within the fold, as each fold is scored on its own.
    cross = np.mean([spearman([held_out[i] for i in range(n) if folds[i] == f],
                              [dice[i] for i in range(n) if folds[i] == f]) for f in range(5)])
    assert in_sample > 0.4 and in_sample > cross + 0.25
    # In sample the noise even beats a random order on AURC: the figure a fit on its own cases would report.
    chosen = summarise(candidates[best(list(range(n)))], dice)
    assert chosen["aurc"] < chosen["aurc_random"]


def _agreement_cases(n: int, seed: int) -> tuple[list, list]:
    agreement, dice = _realistic(n, seed)
    rng = np.random.default_rng(seed + 1)
    signals = [{1: {"agreement": float(a), "voxels": float(rng.uniform(800, 1200)), "soft_dice": float(rng.uniform(0.8, 1)),
                    "expected_error": float(rng.uniform(0.05, 0.2))}} for a in agreement]
    return signals, [{1: float(d)} for d in dice]


def test_the_agreement_estimator_is_monotone_out_of_sample_and_stored() -> None:
    signals, dice = _agreement_cases(40, seed=8)
    cal = fit_calibration(signals, dice, estimator="agreement")
    assert cal.validation["spearman_oos"] > 0.7 and cal.validation["cases"] == 40
    fit = cal.labels[1]
    grid = [fit.estimate({"agreement": a, "voxels": 10.0}) for a in np.linspace(0.3, 1.0, 30)]
    assert all(b >= a for a, b in zip(grid, grid[1:])) and 0.0 <= grid[0] <= grid[-1] <= 1.0
    again = Calibration.from_dict(cal.to_dict())
    assert again is not None and again.estimate(signals[3]) == cal.estimate(signals[3])
    assert fit.estimate({"agreement": math.nan, "voxels": 10.0}) is None
    # An expected structure missing is a failure (0), not an unknown.
    assert fit.estimate({"agreement": 1.0, "voxels": 0.0}) == 0.0
    with pytest.raises(ValueError, match="unknown quality estimator"):
        fit_calibration(signals, dice, estimator="forest")
    with pytest.raises(ValueError, match="one signal"):
        fit_calibration(signals, dice, estimator="agreement", features=("agreement", "soft_dice"))


def test_the_linear_default_is_unchanged_by_the_new_estimator() -> None:
    signals, dice = _agreement_cases(20, seed=9)
    assert fit_calibration(signals, dice).labels[1].features == ("soft_dice", "expected_error", "voxels")
