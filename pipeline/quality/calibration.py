"""The map from a prediction's quality signals to the Dice it can be expected to have, fitted on validation.

Per label, a linear model on three standardised signals, fitted by least squares on the
validation cases' true Dice and clipped to [0, 1]: the model's own expected Dice, its
expected error, and the structure's size (log). Expected Dice and expected error are
nearly one function of each other; together they also carry the ratio of the
probability mass to the labelled volume, which is why the fit is left free rather than
sign-constrained (constrained to "more expected error, lower Dice" it ranked the 42
hippocampus validation cases at rho 0.52 instead of 0.61, and 0.42 instead of 0.48 left
one out). With 40 or so validation cases a richer model would mostly fit noise; the
leave-one-out figures stored with the fit say how it ranks unseen cases.

The signals were chosen on the hippocampus validation fold of a 20-minute CPU model: the
mirrored passes' spread and the boundary entropy ranked a weak model's cases (rho about
0.5) but not a good one's (0.1-0.2), so they are recorded in every ``CASE.json`` and not
used by the estimate.

The review threshold ``min_expected_dice`` defaults to a low quantile (19 %: a review budget of under one case in five) of the
validation cases' lowest per-label estimate, so about that share of in-domain cases is
flagged for review.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import spearmanr

#: the signals the estimate uses.
FEATURES: tuple[str, ...] = ("soft_dice", "expected_error", "voxels")
#: signals spanning orders of magnitude enter as logarithms.
LOG_FEATURES = frozenset({"expected_error", "voxels"})
#: a label found in at least this share of validation references is expected in every case.
ALWAYS_PRESENT = 0.95
MIN_CASES = 5


@dataclass(frozen=True)
class LabelFit:
    """One label's fitted map.

    Args:
        features: the signals used, in order.
        mean: their validation means (standardisation).
        scale: their validation standard deviations.
        weights: the fitted weight per standardised signal.
        intercept: the estimate at the validation means.
        presence: the share of validation references holding this label.
    """

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    intercept: float
    presence: float

    def estimate(self, signals: Mapping[str, float]) -> float | None:
        """The expected Dice for one case's signals of this label.

        Args:
            signals: from :func:`pipeline.quality.signals.quality_signals`.
        """
        if signals.get("voxels", 1.0) == 0:
            # Nothing predicted where the label is (nearly) always present is a failure, not an unknown.
            return 0.0 if self.presence >= ALWAYS_PRESENT else None
        x = [_value(signals, f) for f in self.features]
        if any(math.isnan(v) for v in x):
            return None
        z = [(v - m) / s for v, m, s in zip(x, self.mean, self.scale)]
        return float(np.clip(self.intercept + sum(w * v for w, v in zip(self.weights, z)), 0.0, 1.0))


def _value(signals: Mapping[str, float], feature: str) -> float:
    """One signal as the fit uses it (a logarithm for :data:`LOG_FEATURES`; NaN when missing)."""
    value = float(signals.get(feature, math.nan))
    return math.log(max(value, 1e-6)) if feature in LOG_FEATURES and not math.isnan(value) else value


def _fit_label(x: np.ndarray, y: np.ndarray, presence: float) -> LabelFit:
    """Least squares of ``y`` on the standardised columns of ``x`` (a whisker of ridge keeps tiny sets solvable)."""
    mean, scale = x.mean(0), x.std(0)
    scale[scale < 1e-12] = 1.0
    z = (x - mean) / scale
    # Centred, the intercept is the mean of y.
    coef = np.linalg.solve(z.T @ z + 1e-3 * np.eye(z.shape[1]), z.T @ (y - y.mean()))
    return LabelFit(tuple(FEATURES), tuple(map(float, mean)), tuple(map(float, scale)), tuple(map(float, coef)),
                    float(y.mean()), presence)


@dataclass
class Calibration:
    """The fitted maps of every label, the review threshold, and how well the fit ranked validation cases.

    Args:
        labels: label value -> its fit (labels with too few validation cases have none).
        min_expected_dice: the review threshold on any label's estimate.
        validation: figures of the fit on its validation cases (``cases``, ``spearman``,
            ``spearman_loo``: Spearman's rho between estimated and true mean Dice, in-sample
            and leave-one-out).
    """

    labels: dict[int, LabelFit]
    min_expected_dice: float
    validation: dict[str, float] = field(default_factory=dict)

    def estimate(self, signals: Mapping[int, Mapping[str, float]]) -> dict[int, float | None]:
        """The expected Dice of each label of one case.

        Args:
            signals: label value -> its signals.
        """
        return {v: (self.labels[v].estimate(s) if v in self.labels else None) for v, s in signals.items()}

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the checkpoint's ``inference`` section (JSON)."""
        return {"labels": {str(v): {"features": list(f.features), "mean": list(f.mean), "scale": list(f.scale),
                                    "weights": list(f.weights), "intercept": f.intercept, "presence": f.presence}
                           for v, f in self.labels.items()},
                "min_expected_dice": self.min_expected_dice, "validation": dict(self.validation)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Calibration | None:
        """Inverse of :meth:`to_dict` (``None`` for models saved before calibration existed).

        Args:
            data: the stored calibration.
        """
        if not data:
            return None
        labels = {int(v): LabelFit(tuple(f["features"]), tuple(f["mean"]), tuple(f["scale"]), tuple(f["weights"]),
                                   float(f["intercept"]), float(f["presence"])) for v, f in data["labels"].items()}
        return cls(labels, float(data["min_expected_dice"]), dict(data.get("validation", {})))


def _matrix(signals: Sequence[Mapping[int, Mapping[str, float]]], value: int, rows: Sequence[int]) -> np.ndarray:
    return np.array([[_value(signals[i][value], f) for f in FEATURES] for i in rows], dtype=float)


def fit_calibration(
    signals: Sequence[Mapping[int, Mapping[str, float]]], true_dice: Sequence[Mapping[int, float]],
    min_expected_dice: float | None = None, flag_quantile: float = 0.19,
) -> Calibration:
    """Fit the map from signals to true Dice on validation cases.

    Args:
        signals: per case, label value -> signals (:func:`~pipeline.quality.signals.quality_signals`).
        true_dice: per case, label value -> Dice of the final prediction (NaN: label in neither).
        min_expected_dice: a fixed review threshold; ``None``: the ``flag_quantile`` of the
            cases' lowest leave-one-out estimate.
        flag_quantile: see ``min_expected_dice``.
    """
    n = len(signals)
    values = sorted({v for case in true_dice for v in case})
    fits: dict[int, LabelFit] = {}
    loo = np.full((n, len(values)), np.nan)
    for j, value in enumerate(values):
        y_all = np.array([float(case.get(value, math.nan)) for case in true_dice])
        presence = float(np.mean(~np.isnan(y_all))) if n else 0.0
        usable = [i for i in range(n) if not math.isnan(y_all[i]) and signals[i][value]["voxels"] > 0
                  and not any(math.isnan(_value(signals[i][value], f)) for f in FEATURES)]
        if len(usable) < MIN_CASES:
            continue
        fits[value] = _fit_label(_matrix(signals, value, usable), y_all[usable], presence)
        for i in range(n):
            rest = [k for k in usable if k != i]
            fit = _fit_label(_matrix(signals, value, rest), y_all[rest], presence) if i in usable else fits[value]
            est = fit.estimate(signals[i][value])
            loo[i, j] = math.nan if est is None else est
    calibration = Calibration(fits, 0.0)
    in_sample = np.array([[math.nan if (e := calibration.estimate(signals[i]).get(v)) is None else e
                           for v in values] for i in range(n)], dtype=float)
    truth = np.array([[float(case.get(v, math.nan)) for v in values] for case in true_dice], dtype=float)
    with warnings.catch_warnings():  # a case without any estimate is an all-NaN row: left out below
        warnings.simplefilter("ignore", RuntimeWarning)
        # The estimates the flag will be applied to, so that ``flag_quantile`` of these cases is flagged.
        lowest = np.nanmin(in_sample, axis=1) if n and values else np.array([])
    lowest = lowest[~np.isnan(lowest)]
    calibration.min_expected_dice = (float(min_expected_dice) if min_expected_dice is not None
                                     else float(np.quantile(lowest, flag_quantile)) if lowest.size else 0.0)
    calibration.validation = {"cases": float(n), "spearman": _rho(in_sample, truth), "spearman_loo": _rho(loo, truth)}
    return calibration


def _rho(estimates: np.ndarray, truth: np.ndarray) -> float:
    """Spearman's rho between estimated and true mean Dice over the cases where both exist."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        est, true = np.nanmean(estimates, axis=1), np.nanmean(truth, axis=1)
    ok = ~(np.isnan(est) | np.isnan(true))
    if ok.sum() < 3:
        return math.nan
    return float(spearmanr(est[ok], true[ok])[0])
