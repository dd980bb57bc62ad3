"""The estimate from agreement: per label, a monotone (isotonic) map from one agreement signal to Dice.

The alternative to the linear map of :mod:`pipeline.quality.calibration` (``estimator="agreement"``
in :func:`~pipeline.quality.calibration.fit_calibration`): per label, scikit-learn's
``IsotonicRegression(increasing=True, out_of_bounds="clip")`` from the members' agreement
(:mod:`pipeline.quality.agreement`; ``agreement`` by default, ``agreement_members`` for an
ensemble) to the true Dice of the validation cases. A monotone map has no free weights to fit
noise with on a few dozen cases, and it cannot change the ranking the agreement gives (ties
aside), so what it is worth is what the agreement is worth. It is fitted on the validation cases
of the fold the model was trained on: the model never saw them, so their agreement is the
agreement of an unseen case.

Gross failures are not the map's business: an expected structure missing is estimated 0 here as
in the linear map, and the input check flags on its own (:func:`pipeline.quality.records.review`).

The fitted map is stored as its breakpoints and evaluated with ``numpy.interp`` (what the
regression's ``predict`` does with ``out_of_bounds="clip"``): predicting never imports scikit-learn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

#: the estimator's name in :func:`~pipeline.quality.calibration.fit_calibration`.
NAME = "agreement"
#: the signal the map reads by default.
FEATURE = "agreement"
#: a label found in at least this share of validation references is expected in every case (as the linear map's).
ALWAYS_PRESENT = 0.95


@dataclass(frozen=True)
class IsotonicFit:
    """One label's monotone map from an agreement signal to Dice.

    Args:
        feature: the signal read (``agreement`` or ``agreement_members``).
        x: the map's breakpoints on the signal's scale, increasing.
        y: the Dice at each breakpoint, non-decreasing.
        presence: the share of validation references holding this label.
    """

    feature: str
    x: tuple[float, ...]
    y: tuple[float, ...]
    presence: float

    @property
    def features(self) -> tuple[str, ...]:
        """The signals used (one), as :class:`~pipeline.quality.calibration.LabelFit` names them."""
        return (self.feature,)

    def estimate(self, signals: Mapping[str, float]) -> float | None:
        """The expected Dice for one case's signals of this label (``None``: no agreement known).

        Args:
            signals: from :func:`pipeline.quality.signals.quality_signals`.
        """
        if signals.get("voxels", 1.0) == 0:
            # Nothing predicted where the label is (nearly) always present is a failure, not an unknown.
            return 0.0 if self.presence >= ALWAYS_PRESENT else None
        value = float(signals.get(self.feature, math.nan))
        if math.isnan(value) or not self.x:
            return None
        return float(np.clip(np.interp(value, self.x, self.y), 0.0, 1.0))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON) for the checkpoint's ``inference.quality``."""
        return {"kind": NAME, "feature": self.feature, "x": list(self.x), "y": list(self.y), "presence": self.presence}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IsotonicFit:
        """Inverse of :meth:`to_dict`.

        Args:
            data: one label's stored map.
        """
        return cls(str(data["feature"]), tuple(map(float, data["x"])), tuple(map(float, data["y"])),
                   float(data["presence"]))


def fit_isotonic(x: np.ndarray, y: np.ndarray, presence: float, feature: str = FEATURE) -> IsotonicFit:
    """The increasing isotonic regression of ``y`` (true Dice) on ``x`` (agreement), clipped outside the fitted range.

    Args:
        x: one column of agreement values (``(n, 1)`` or ``(n,)``).
        y: the cases' true Dice of the label.
        presence: the share of validation references holding the label.
        feature: the signal ``x`` holds.
    """
    from sklearn.isotonic import IsotonicRegression  # here: fitting only; predictions interpolate the breakpoints

    x = np.asarray(x, dtype=float).reshape(-1)
    model = IsotonicRegression(increasing=True, out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(x, np.asarray(y, float))
    return IsotonicFit(feature, tuple(map(float, model.X_thresholds_)), tuple(map(float, model.y_thresholds_)), presence)

