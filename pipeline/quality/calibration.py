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
used by the estimate. So are ``fragments`` and ``volume_z``: on the same fold (42 cases) the
first lifted the out-of-sample rho from 0.42 to 0.50 on the strength of one fragmented case per
label, and caught one worst case fewer; the second lowered it to 0.39
(``scripts/quality_features.py`` compares feature sets on any finished evaluation).

The review threshold ``min_expected_dice`` defaults to a low quantile (19 %: a review budget of under one case in five) of the
validation cases' lowest per-label estimate, so about that share of in-domain cases is
flagged for review. Those estimates are the cross-fitted (leave-one-out) ones, each case
estimated by a fit that never saw it: in-sample estimates sit closer to the truth than any
unseen case's will (on the hippocampus fold the fit ranked its own cases at rho 0.61, left
one out at 0.48 and truly unseen cases at 0.25), so a threshold taken from them flags a
different share of new cases than the one asked for. The figures that say whether the
estimate can be trusted (``spearman_oos``, ``worst5_caught``, ``flagged_share``, and
``reliable`` from them) come from the same out-of-sample estimates; since issue 38 also rho's bootstrap
95 % interval and the AURC against a random order's (:mod:`pipeline.quality.validation`), and with them
``reliable`` asks for the interval's lower end above 0.3 and an AURC below random's instead of a rho of 0.5.

``estimator="agreement"`` fits the alternative map of :mod:`pipeline.quality.isotonic` (per label, monotone
in the members' agreement); the linear map stays the default until the agreement map is measured better
out of sample on every task (``scripts/quality_estimate.py``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.quality import isotonic, validation

#: the signals the estimate uses.
FEATURES: tuple[str, ...] = ("soft_dice", "expected_error", "voxels")
#: the estimators :func:`fit_calibration` can fit, by name: ``linear`` (today's default, :data:`FEATURES`) and
#: ``agreement`` (an isotonic map from the members' agreement, :mod:`pipeline.quality.isotonic`).
ESTIMATORS = ("linear", isotonic.NAME)
#: signals spanning orders of magnitude enter as logarithms.
LOG_FEATURES = frozenset({"expected_error", "voxels"})
#: a label found in at least this share of validation references is expected in every case.
ALWAYS_PRESENT = 0.95
MIN_CASES = 5
#: how many of the validation cases with the lowest true mean Dice ``worst5_caught`` looks at.
WORST_CASES = 5
#: the estimate is reliable when its out-of-sample rho reaches this ...
RELIABLE_MIN_RHO = 0.5
#: ... the flag catches at least this many of the :data:`WORST_CASES` worst validation cases ...
RELIABLE_MIN_WORST_CAUGHT = 3
#: ... and flags at most this share of the validation cases (a review budget of one in four).
RELIABLE_MAX_FLAGGED_SHARE = 0.25
#: the figures a calibration fitted since they exist carries (older ones lack them: reliability unknown).
OOS_KEYS = ("spearman_oos", "worst5_caught", "flagged_share")
#: the out-of-sample ranking figures of :mod:`pipeline.quality.validation` a calibration fitted since they exist
#: carries: with them, :func:`pipeline.quality.validation.reliable` (rho's interval, AURC against random) replaces
#: the ``spearman_oos >= 0.5`` criterion.
INTERVAL_KEYS = ("spearman_oos_low", "spearman_oos_high", "aurc_oos", "aurc_random")


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


def _apart(value: float, bound: float, digits: int = 2) -> str:
    """``value`` with as many decimals as keep it from reading as ``bound`` (0.4996 against 0.5 reads 0.4996, not 0.50)."""
    for d in range(digits, 7):
        if float(text := f"{value:.{d}f}") != bound:  # NaN is never equal: it reads "nan"
            return text
    return repr(value)


def _value(signals: Mapping[str, float], feature: str) -> float:
    """One signal as the fit uses it (a logarithm for :data:`LOG_FEATURES`; NaN when missing)."""
    value = float(signals.get(feature, math.nan))
    return math.log(max(value, 1e-6)) if feature in LOG_FEATURES and not math.isnan(value) else value


def _fit_label(x: np.ndarray, y: np.ndarray, presence: float, features: Sequence[str] = FEATURES) -> LabelFit:
    """Least squares of ``y`` on the standardised columns of ``x`` (``features``, in order; a whisker of ridge keeps
    tiny sets solvable)."""
    mean, scale = x.mean(0), x.std(0)
    scale[scale < 1e-12] = 1.0
    z = (x - mean) / scale
    # Centred, the intercept is the mean of y.
    coef = np.linalg.solve(z.T @ z + 1e-3 * np.eye(z.shape[1]), z.T @ (y - y.mean()))
    return LabelFit(tuple(features), tuple(map(float, mean)), tuple(map(float, scale)), tuple(map(float, coef)),
                    float(y.mean()), presence)


@dataclass
class Calibration:
    """The fitted maps of every label, the review threshold, and how well the fit ranked validation cases.

    Args:
        labels: label value -> its fit (labels with too few validation cases have none).
        min_expected_dice: the review threshold on any label's estimate.
        validation: figures of the fit on its validation cases: ``cases``; ``spearman`` and
            ``spearman_loo``, Spearman's rho between estimated and true mean Dice in-sample and
            leave-one-out; from the out-of-sample estimates (since these exist) ``spearman_oos``
            (their rho), ``worst5_caught`` (how many of the :data:`WORST_CASES` cases with the
            lowest true mean Dice the threshold flags), ``flagged_share`` (the share of cases it
            flags), ``spearman_oos_low`` and ``spearman_oos_high`` (its bootstrap 95 % interval), ``aurc_oos``
            and ``aurc_random`` (the risk-coverage area and a random order's) and ``reliable`` (1.0 or 0.0, see
            :meth:`reliable`).
    """

    labels: dict[int, LabelFit | isotonic.IsotonicFit]
    min_expected_dice: float
    validation: dict[str, float] = field(default_factory=dict)

    def estimate(self, signals: Mapping[int, Mapping[str, float]]) -> dict[int, float | None]:
        """The expected Dice of each label of one case.

        Args:
            signals: label value -> its signals.
        """
        return {v: (self.labels[v].estimate(s) if v in self.labels else None) for v, s in signals.items()}

    @property
    def rho(self) -> float:
        """Spearman's rho of the estimate on unseen validation cases (leave-one-out for models saved before
        ``spearman_oos`` existed; NaN when unknown)."""
        v = self.validation
        return float(v["spearman_oos"] if "spearman_oos" in v else v.get("spearman_loo", math.nan))

    @property
    def reliable(self) -> bool | None:
        """Whether the estimate held on unseen validation cases (``None``: not known, a model saved before
        the out-of-sample figures existed)."""
        return None if not all(k in self.validation for k in OOS_KEYS) else not self.shortcomings()

    def shortcomings(self) -> list[str]:
        """Why the estimate is not reliable, one phrase per failed criterion (empty: reliable, or not known)."""
        v = self.validation
        if not all(k in v for k in OOS_KEYS):
            return []
        rho, caught, share = float(v["spearman_oos"]), float(v["worst5_caught"]), float(v["flagged_share"])
        worst = min(WORST_CASES, int(v.get("cases", WORST_CASES)))
        why = []
        if all(k in v for k in INTERVAL_KEYS):
            # The ranking judged by its interval and its AURC (one rule, pipeline.quality.validation.reliable).
            why += validation.reliable({"spearman_low": v["spearman_oos_low"], "aurc": v["aurc_oos"],
                                        "aurc_random": v["aurc_random"]})[1]
        elif not rho >= RELIABLE_MIN_RHO:  # NaN (too few cases to rank) is not reliable either
            why.append(f"rho {_apart(rho, RELIABLE_MIN_RHO)} < {RELIABLE_MIN_RHO}")
        if caught < RELIABLE_MIN_WORST_CAUGHT:
            why.append(f"it flags {caught:.0f} of the {worst} worst validation cases (< {RELIABLE_MIN_WORST_CAUGHT})")
        if share > RELIABLE_MAX_FLAGGED_SHARE:
            percent = _apart(100 * share, 100 * RELIABLE_MAX_FLAGGED_SHARE, 0)
            why.append(f"it flags {percent}% of the validation cases (> {RELIABLE_MAX_FLAGGED_SHARE:.0%})")
        return why

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the checkpoint's ``inference`` section (JSON)."""
        return {"labels": {str(v): f.to_dict() if isinstance(f, isotonic.IsotonicFit) else
                           {"features": list(f.features), "mean": list(f.mean), "scale": list(f.scale),
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
        labels: dict[int, LabelFit | isotonic.IsotonicFit] = {
            int(v): isotonic.IsotonicFit.from_dict(f) if f.get("kind") == isotonic.NAME else
            LabelFit(tuple(f["features"]), tuple(f["mean"]), tuple(f["scale"]), tuple(f["weights"]),
                     float(f["intercept"]), float(f["presence"])) for v, f in data["labels"].items()}
        return cls(labels, float(data["min_expected_dice"]), dict(data.get("validation", {})))


def _matrix(signals: Sequence[Mapping[int, Mapping[str, float]]], value: int, rows: Sequence[int],
            features: Sequence[str] = FEATURES) -> np.ndarray:
    return np.array([[_value(signals[i][value], f) for f in features] for i in rows], dtype=float)


def fit_calibration(
    signals: Sequence[Mapping[int, Mapping[str, float]]], true_dice: Sequence[Mapping[int, float]],
    min_expected_dice: float | None = None, flag_quantile: float = 0.19, features: Sequence[str] | None = None,
    estimator: str = "linear",
) -> Calibration:
    """Fit the map from signals to true Dice on validation cases.

    Args:
        signals: per case, label value -> signals (:func:`~pipeline.quality.signals.quality_signals`).
        true_dice: per case, label value -> Dice of the final prediction (NaN: label in neither).
        min_expected_dice: a fixed review threshold; ``None``: the ``flag_quantile`` of the
            cases' lowest leave-one-out estimate.
        flag_quantile: see ``min_expected_dice``.
        features: the signals the map uses (default: :data:`FEATURES` for ``linear``, ``("agreement",)`` for
            ``agreement``; others to compare candidates, ``scripts/quality_features.py``).
        estimator: which map (:data:`ESTIMATORS`): ``linear``, least squares on ``features``; ``agreement``, an
            isotonic map from the one signal in ``features`` (:mod:`pipeline.quality.isotonic`).
    """
    n = len(signals)
    values = sorted({v for case in true_dice for v in case})
    features = _features(estimator, features)
    fits, oos = _cross_fit(signals, true_dice, values, features, _fitter(estimator))
    calibration = Calibration(fits, 0.0)
    in_sample = np.array([[math.nan if (e := calibration.estimate(signals[i]).get(v)) is None else e
                           for v in values] for i in range(n)], dtype=float)
    truth = np.array([[float(case.get(v, math.nan)) for v in values] for case in true_dice], dtype=float)
    lowest = _lowest(oos)
    # The estimates the flag will meet are of unseen cases: the quantile of those flags ``flag_quantile`` of new cases.
    known = lowest[~np.isnan(lowest)]
    calibration.min_expected_dice = (float(min_expected_dice) if min_expected_dice is not None
                                     else float(np.quantile(known, flag_quantile)) if known.size else 0.0)
    caught, share = screening(lowest, _mean(truth), calibration.min_expected_dice)
    rho_oos = _rho(oos, truth)
    ranking = validation.summarise(_mean(oos), _mean(truth))
    calibration.validation = {"cases": float(n), "spearman": _rho(in_sample, truth), "spearman_loo": rho_oos,
                              "spearman_oos": rho_oos, "worst5_caught": float(caught), "flagged_share": share,
                              "spearman_oos_low": ranking["spearman_low"], "spearman_oos_high": ranking["spearman_high"],
                              "aurc_oos": ranking["aurc"], "aurc_random": ranking["aurc_random"]}
    calibration.validation["reliable"] = float(bool(calibration.reliable))
    return calibration


#: fits one label's map: (signal matrix, true Dice, presence, features) -> a fit with ``estimate(signals)``.
Fitter = Callable[[np.ndarray, np.ndarray, float, Sequence[str]], Any]


def _features(estimator: str, features: Sequence[str] | None) -> tuple[str, ...]:
    """The signals ``estimator`` reads: ``features``, or its default; one for ``agreement``."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown quality estimator {estimator!r} (known: {', '.join(ESTIMATORS)})")
    if estimator == isotonic.NAME:
        chosen = tuple(features) if features is not None else (isotonic.FEATURE,)
        if len(chosen) != 1:
            raise ValueError(f"the agreement estimator maps one signal, not {len(chosen)} ({', '.join(chosen)})")
        return chosen
    return tuple(features) if features is not None else FEATURES


def _fitter(estimator: str) -> Fitter:
    """The per-label fitting function of ``estimator``."""
    if estimator == isotonic.NAME:
        return lambda x, y, presence, features: isotonic.fit_isotonic(x[:, 0], y, presence, features[0])
    return _fit_label


def _cross_fit(
    signals: Sequence[Mapping[int, Mapping[str, float]]], true_dice: Sequence[Mapping[int, float]], values: Sequence[int],
    features: Sequence[str] = FEATURES, fit_label: Fitter | None = None,
) -> tuple[dict[int, Any], np.ndarray]:
    """Each label's fit on all usable cases, and every case's out-of-sample estimates (cases x ``values``, NaN: none).

    A case the label's fit used is estimated by the fit on the others (leave one out); one it
    did not use (its Dice or signals missing) by the full fit, which never saw it either.
    """
    n = len(signals)
    fit_label = fit_label or _fit_label
    fits: dict[int, Any] = {}
    oos = np.full((n, len(values)), np.nan)
    for j, value in enumerate(values):
        y_all = np.array([float(case.get(value, math.nan)) for case in true_dice])
        presence = float(np.mean(~np.isnan(y_all))) if n else 0.0
        usable = [i for i in range(n) if not math.isnan(y_all[i]) and signals[i][value].get("voxels", 0) > 0
                  and not any(math.isnan(_value(signals[i][value], f)) for f in features)]
        if len(usable) < MIN_CASES:
            continue
        fits[value] = fit_label(_matrix(signals, value, usable, features), y_all[usable], presence, features)
        for i in range(n):
            rest = [k for k in usable if k != i]
            fit = (fit_label(_matrix(signals, value, rest, features), y_all[rest], presence, features) if i in usable
                   else fits[value])
            est = fit.estimate(signals[i][value])
            oos[i, j] = math.nan if est is None else est
    return fits, oos


def out_of_sample_estimates(
    signals: Sequence[Mapping[int, Mapping[str, float]]], true_dice: Sequence[Mapping[int, float]],
    features: Sequence[str] | None = None, estimator: str = "linear",
) -> list[dict[int, float | None]]:
    """Per validation case, label value -> the estimate of a fit that did not see the case (as :func:`fit_calibration`).

    Args:
        signals: per case, label value -> signals.
        true_dice: per case, label value -> Dice.
        features: the signals the map uses (default: the estimator's).
        estimator: which map (:data:`ESTIMATORS`).
    """
    values = sorted({v for case in true_dice for v in case})
    features = _features(estimator, features)
    _, oos = _cross_fit(signals, true_dice, values, features, _fitter(estimator))
    return [{v: (None if math.isnan(row[j]) else float(row[j])) for j, v in enumerate(values)} for row in oos]


def screening(lowest: np.ndarray, true_mean: np.ndarray, threshold: float) -> tuple[int, float]:
    """How the review flag did on the validation cases: (worst caught, flagged share).

    Args:
        lowest: per case, its lowest per-label estimate (NaN: none, never flagged by the estimate).
        true_mean: per case, its true mean Dice (NaN: unknown, not among the worst).
        threshold: the review threshold.

    Returns:
        How many of the :data:`WORST_CASES` cases with the lowest true mean Dice have their
        lowest estimate below ``threshold``, and the share of all the cases that have.
    """
    lowest, true_mean = np.asarray(lowest, dtype=float), np.asarray(true_mean, dtype=float)
    with np.errstate(invalid="ignore"):
        flagged = lowest < threshold  # NaN compares False: no estimate, no flag from it
    ranked = [i for i in np.argsort(true_mean, kind="stable") if not math.isnan(true_mean[i])]
    caught = int(sum(flagged[i] for i in ranked[:WORST_CASES]))
    return caught, float(flagged.mean()) if flagged.size else 0.0


def _lowest(estimates: np.ndarray) -> np.ndarray:
    """Each case's lowest per-label estimate (NaN: none)."""
    with warnings.catch_warnings():  # a case without any estimate is an all-NaN row
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmin(estimates, axis=1) if estimates.size else np.full(len(estimates), np.nan)


def _mean(values: np.ndarray) -> np.ndarray:
    """Each case's mean over its labels (NaN: none)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=1) if values.size else np.full(len(values), np.nan)


def _rho(estimates: np.ndarray, truth: np.ndarray) -> float:
    """Spearman's rho between estimated and true mean Dice over the cases where both exist."""
    est, true = _mean(estimates), _mean(truth)
    ok = ~(np.isnan(est) | np.isnan(true))
    if ok.sum() < 3:
        return math.nan
    from scipy.stats import spearmanr  # here: scipy.stats costs every predict 0.4 s of start-up, and only fitting ranks

    return float(spearmanr(est[ok], true[ok])[0])
