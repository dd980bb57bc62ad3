"""What a quality estimate is worth on cases it never saw: the statistics, and the rule that calls it reliable.

* **Spearman's rho with a bootstrap interval**: the cases are resampled with replacement
  (:data:`RESAMPLES` times, a fixed :data:`SEED`, so a figure can be reproduced) and the
  2.5th and 97.5th percentiles of the resampled rho give the 95 % interval (percentile
  bootstrap). With a few dozen cases one rho means little: n = 8 and rho = 0.5 span about
  [-0.3, 0.9].
* **Risk-coverage and AURC**: the cases sorted from most to least trusted by the estimate;
  at each coverage k/n the risk is the mean (1 - true Dice) of the k cases accepted so far;
  AURC is the mean of those risks over k = 1..n (lower is better). A random order's expected
  AURC is mean(1 - Dice) (every prefix of a random order has that expected mean); the
  perfect order (by true Dice) gives the lowest AURC the cases allow. Ties in the estimate
  are given their average risk, so an estimate that says nothing (a constant) scores
  random's AURC, not a lucky or unlucky order.
* **Screening**: the share of cases flagged and how many of the ``k`` worst (by true mean
  Dice) are among them.
* :func:`reliable`: the one rule (documented there) that turns these into a verdict.
* **Cross-fitting** (:func:`cross_fit`): fit on every group (fold) but one, score the one
  held out; it refuses a fit whose cases overlap the cases it scores
  (:func:`check_disjoint`), so a figure can never come from cases a signal, a map or a
  threshold was chosen on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

#: bootstrap resamples of the cases.
RESAMPLES = 2000
#: the bootstrap's seed: the same records give the same interval.
SEED = 0
#: the interval's coverage.
LEVEL = 0.95
#: :func:`reliable`: the lower end of rho's 95 % interval must exceed this ...
RELIABLE_MIN_RHO_LOW = 0.3
#: how many of the worst cases :func:`summarise` checks the flag against.
WORST_K = 5

Model = TypeVar("Model")


@dataclass(frozen=True)
class Interval:
    """A statistic with its bootstrap interval.

    Args:
        value: the statistic on the cases themselves.
        low: the interval's lower end.
        high: its upper end.
        n: the cases it was computed on.
    """

    value: float
    low: float
    high: float
    n: int


def _paired(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The pairs where both values are known."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = ~(np.isnan(a) | np.isnan(b))
    return a[ok], b[ok]


def _row_spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row of ``x`` with the same row of ``y`` (NaN where a row is constant)."""
    from scipy.stats import rankdata  # here: only validation ranks; predict never imports scipy.stats

    rx, ry = rankdata(x, axis=-1), rankdata(y, axis=-1)
    rx = rx - rx.mean(-1, keepdims=True)
    ry = ry - ry.mean(-1, keepdims=True)
    denominator = np.sqrt((rx * rx).sum(-1) * (ry * ry).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (rx * ry).sum(-1) / denominator, np.nan)


def spearman(estimate: Sequence[float], truth: Sequence[float]) -> float:
    """Spearman's rho between an estimate and the true values over the cases where both are known (NaN: < 3).

    Args:
        estimate: per case, the estimate (NaN: none).
        truth: per case, the true value (NaN: unknown).
    """
    x, y = _paired(estimate, truth)
    return float(_row_spearman(x, y)) if x.size >= 3 else math.nan


def spearman_interval(
    estimate: Sequence[float], truth: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED,
    level: float = LEVEL,
) -> Interval:
    """Spearman's rho with its percentile-bootstrap interval (cases resampled with replacement).

    Args:
        estimate: per case, the estimate (NaN: left out).
        truth: per case, the true value (NaN: left out).
        resamples: bootstrap resamples.
        seed: the resampling's seed.
        level: the interval's coverage.
    """
    x, y = _paired(estimate, truth)
    n = int(x.size)
    if n < 3:
        return Interval(math.nan, math.nan, math.nan, n)
    rng = np.random.default_rng(seed)
    rows = []
    # In blocks: 2000 resamples of 200 cases at once would be 3 MB per array, of a few thousand, a lot more.
    for start in range(0, resamples, 250):
        idx = rng.integers(0, n, size=(min(250, resamples - start), n))
        rows.append(_row_spearman(x[idx], y[idx]))
    rhos = np.concatenate(rows)
    rhos = rhos[~np.isnan(rhos)]  # a resample of all-tied values ranks nothing
    if rhos.size == 0:
        return Interval(float(_row_spearman(x, y)), math.nan, math.nan, n)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(rhos, [tail, 100 - tail])
    return Interval(float(_row_spearman(x, y)), float(low), float(high), n)


def risk_coverage(confidence: Sequence[float], dice: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The risk-coverage curve: cases accepted from most to least trusted, the mean loss (1 - Dice) so far.

    Cases tied in ``confidence`` are accepted together, each at their average loss: a tie is no ranking.

    Args:
        confidence: per case, how far it is trusted (the estimated Dice; higher: accepted first).
        dice: per case, its true Dice.

    Returns:
        The coverages k/n and the risks at each, k = 1..n (over the cases where both are known).
    """
    c, d = _paired(confidence, dice)
    n = c.size
    if n == 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(-c, kind="stable")
    c, loss = c[order], 1.0 - d[order]
    # Each run of tied estimates gets its mean loss.
    _, starts, counts = np.unique(-c, return_index=True, return_counts=True)
    for s, k in zip(starts, counts):
        if k > 1:
            loss[s:s + k] = loss[s:s + k].mean()
    k = np.arange(1, n + 1)
    return k / n, np.cumsum(loss) / k


def aurc(confidence: Sequence[float], dice: Sequence[float]) -> float:
    """The area under the risk-coverage curve: the mean risk over coverages (lower: the estimate ranks better).

    Args:
        confidence: per case, the estimate (higher: more trusted).
        dice: per case, its true Dice.
    """
    _, risk = risk_coverage(confidence, dice)
    return float(risk.mean()) if risk.size else math.nan


def random_aurc(dice: Sequence[float]) -> float:
    """The expected AURC of a random order: the mean loss, mean(1 - Dice).

    Args:
        dice: per case, its true Dice (NaN: left out).
    """
    d = np.asarray(dice, dtype=float)
    d = d[~np.isnan(d)]
    return float((1.0 - d).mean()) if d.size else math.nan


def worst_caught(flagged: Sequence[bool], dice: Sequence[float], k: int = WORST_K) -> int:
    """How many of the ``k`` cases with the lowest true Dice are flagged.

    Args:
        flagged: per case, whether it is flagged.
        dice: per case, its true (mean) Dice (NaN: unknown, never among the worst).
        k: how many of the worst to look at.
    """
    d = np.asarray(dice, dtype=float)
    ranked = [i for i in np.argsort(d, kind="stable") if not math.isnan(d[i])]
    return int(sum(bool(flagged[i]) for i in ranked[:k]))


def summarise(
    estimate: Sequence[float], truth: Sequence[float], flagged: Sequence[bool] | None = None,
    reference: Sequence[float] | None = None, resamples: int = RESAMPLES, seed: int = SEED, worst: int = WORST_K,
) -> dict[str, float]:
    """Every per-case figure of an estimate on cases it never saw.

    Args:
        estimate: per case, the estimated (mean) Dice (NaN: none; left out of rho and AURC).
        truth: per case, the true (mean) Dice.
        flagged: per case, whether the review flag is raised (``None``: no screening figures).
        reference: another estimate of the same cases (e.g. today's) to compare the AURC with.
        resamples: bootstrap resamples for rho's interval.
        seed: the bootstrap's seed.
        worst: how many of the worst cases the flag is checked against.

    Returns:
        ``cases``, ``spearman``, ``spearman_low``, ``spearman_high``; ``aurc``, ``aurc_random`` and
        ``aurc_optimal`` (each over the cases the estimate covers); with ``reference``, ``aurc_reference``
        (over the same cases); with ``flagged``, ``flagged_share``, ``worst_caught`` and ``worst``.
    """
    est, true = np.asarray(estimate, dtype=float), np.asarray(truth, dtype=float)
    interval = spearman_interval(est, true, resamples, seed)
    covered = ~(np.isnan(est) | np.isnan(true))
    out = {"cases": float(interval.n), "spearman": interval.value, "spearman_low": interval.low,
           "spearman_high": interval.high, "aurc": aurc(est, true), "aurc_random": random_aurc(true[covered]),
           "aurc_optimal": aurc(true[covered], true[covered])}
    if reference is not None:
        ref = np.asarray(reference, dtype=float)
        # On the cases both estimates cover: a reference that covers fewer would otherwise be scored on others.
        both = covered & ~np.isnan(ref)
        out["aurc_reference"] = aurc(ref[both], true[both])
        out["aurc_on_reference_cases"] = aurc(est[both], true[both])
    if flagged is not None:
        flags = np.asarray(flagged, dtype=bool)
        known = ~np.isnan(true)
        out["flagged_share"] = float(flags[known].mean()) if known.any() else math.nan
        out["worst_caught"] = float(worst_caught(flags, true, worst))
        out["worst"] = float(min(worst, int(known.sum())))
    return out


def per_structure(
    estimates: Mapping[str, Sequence[float]], truth: Mapping[str, Sequence[float]], resamples: int = RESAMPLES,
    seed: int = SEED,
) -> dict[str, Interval]:
    """Spearman's rho with its interval for each structure (its cases where both values are known).

    Args:
        estimates: structure -> per case, its estimated Dice.
        truth: structure -> per case, its true Dice.
        resamples: bootstrap resamples.
        seed: the bootstrap's seed.
    """
    return {name: spearman_interval(estimates[name], truth[name], resamples, seed) for name in estimates
            if name in truth}


def reliable(summary: Mapping[str, float]) -> tuple[bool, list[str]]:
    """The rule: an estimate is reliable when, on cases it never saw, the lower end of the 95 % interval of its
    Spearman rho exceeds :data:`RELIABLE_MIN_RHO_LOW` (0.3) and its AURC is below a random order's.

    The interval, not the point estimate: on 40 cases a rho of 0.5 is compatible with 0.2. Both
    conditions, because a rank correlation can be carried by the good cases while the cases
    accepted first are no better than random (AURC), and the AURC alone does not say how sure it is.

    Args:
        summary: from :func:`summarise` (``spearman_low``, ``aurc``, ``aurc_random``).

    Returns:
        The verdict and, when it is not reliable, one phrase per failed condition.
    """
    why = []
    low = float(summary.get("spearman_low", math.nan))
    if not low > RELIABLE_MIN_RHO_LOW:  # NaN: too few cases to rank, not reliable
        why.append(f"the 95 % interval of rho reaches down to {low:.2f} (needs > {RELIABLE_MIN_RHO_LOW})")
    a, r = float(summary.get("aurc", math.nan)), float(summary.get("aurc_random", math.nan))
    if not a < r:
        why.append(f"AURC {a:.4f} is not below a random order's {r:.4f}")
    return not why, why


def check_disjoint(fit_cases: Sequence[Hashable], score_cases: Sequence[Hashable]) -> None:
    """Refuse to score cases a fit has seen.

    Args:
        fit_cases: the identities of the cases a signal, map or threshold is fitted or chosen on.
        score_cases: those of the cases it is then scored on.

    Raises:
        ValueError: some case is in both (named in the message).
    """
    both = set(fit_cases) & set(score_cases)
    if both:
        shown = ", ".join(sorted(map(str, both))[:5])
        raise ValueError(f"{len(both)} case(s) would be scored by a fit that saw them ({shown}"
                         f"{', ...' if len(both) > 5 else ''}): fit and score on disjoint cases")


def cross_fit(
    groups: Sequence[Hashable], fit: Callable[[list[int]], Model], score: Callable[[Model, list[int]], Sequence[Any]],
    case_ids: Sequence[Hashable] | None = None,
) -> list[Any]:
    """Out-of-group results: for each group, fit on every other group's cases and score the group's own.

    Args:
        groups: per case, its group (a fold; each case its own group: leave one out).
        fit: the indices of the cases to fit on -> a fitted model.
        score: (model, indices of the cases to score) -> one result per scored case, in that order.
        case_ids: per case, its identity (default: its index); a case id in both the fit and the scored
            cases (the same case in two folds, e.g. from two split seeds pooled) is refused.

    Returns:
        Per case, its result from the fit on the other groups (``None`` for a group alone: nothing to fit on).

    Raises:
        ValueError: a fit would have seen a case it scores.
    """
    ids = list(case_ids) if case_ids is not None else list(range(len(groups)))
    out: list[Any] = [None] * len(groups)
    for group in dict.fromkeys(groups):
        held = [i for i, g in enumerate(groups) if g == group]
        rest = [i for i, g in enumerate(groups) if g != group]
        if not rest:
            continue
        check_disjoint([ids[i] for i in rest], [ids[i] for i in held])
        for i, result in zip(held, score(fit(rest), held)):
            out[i] = result
    return out
