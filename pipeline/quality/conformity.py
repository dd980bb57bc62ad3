"""Is an input like the data the model was trained on? The training fingerprint and the check against it.

At preprocessing, :func:`pipeline.data.training_fingerprint` summarises the training cases: the modality
of each channel, spacing and field of view (after reorientation to the plan's axes), how
oblique the scans were, and the distribution of normalised intensities (a few percentiles
of each normalised case). The plan carries it, and so every checkpoint and registered
model. At prediction, :func:`check_conformity` compares one input with it and gives a
reason for every way it differs, e.g. ``spacing 0.43x0.43x6.50 mm, trained on
1.00x1.00x1.00 mm``. Normalised intensities are compared, not raw ones: raw MRI
intensities differ arbitrarily between scanners (the hippocampus cases' maxima range from
about 100 to 1.7e6) while their normalised distribution is stable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.data import intensity_distance, intensity_percentiles, obliquity_deg

#: spacing outside [min / f, max * f] of the training spacings (per axis) does not conform.
SPACING_FACTOR = 1.5
#: a field of view outside [min / f, max * f] of the training ones (per axis) does not conform.
EXTENT_FACTOR = 2.0
#: degrees of obliquity beyond the most oblique training case.
OBLIQUITY_MARGIN_DEG = 10.0
#: a normalised-intensity distance beyond this multiple of the training cases' largest one does not conform.
INTENSITY_FACTOR = 1.5


@dataclass(frozen=True)
class Conformity:
    """How an input compares with the training data.

    Args:
        conforms: no difference was found (``True`` too when the model carries no fingerprint).
        reasons: one sentence per difference.
        checked: whether there was a fingerprint to check against.
    """

    conforms: bool
    reasons: list[str] = field(default_factory=list)
    checked: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``CASE.json``."""
        return {"conforms": self.conforms, "reasons": list(self.reasons), "checked": self.checked}


def _fmt(values: Sequence[float], digits: int = 2) -> str:
    return "x".join(f"{v:.{digits}f}" for v in values)


def _ras_spacing_and_extent(affine: np.ndarray, shape: Sequence[int]) -> tuple[list[float], list[float]]:
    """Spacing and field of view along the patient's R, A, S axes (the voxel axis nearest each)."""
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    axis_of = np.argmax(np.abs(m / spacing), axis=1)  # world axis -> nearest voxel axis
    if len(set(axis_of.tolist())) < 3:
        axis_of = np.arange(3)
    sp = [float(spacing[a]) for a in axis_of]
    return sp, [float(spacing[a] * shape[a]) for a in axis_of]


def _modality_reason(fingerprint: Mapping[str, Any], modality: str | None) -> str | None:
    """A DICOM input's Modality against the trained channel's (only CT versus not-CT can be told apart)."""
    trained = str(next(iter(fingerprint.get("modalities", {}).values()), "")).strip()
    if not modality or not trained:
        return None
    if (modality.upper() == "CT") != (trained.upper() == "CT"):
        return f"modality {modality}, trained on {trained}"
    return None


def check_conformity(
    fingerprint: Mapping[str, Any] | None, affine: np.ndarray, shape: Sequence[int], normalised: np.ndarray,
    modality: str | None = None,
) -> Conformity:
    """Compare one input with the training fingerprint.

    Args:
        fingerprint: from :func:`training_fingerprint` (``None``: nothing to check, the input conforms).
        affine: the input's own 4x4 RAS affine.
        shape: the input's own spatial shape.
        normalised: ``(C, X, Y, Z)`` the input as the network sees it (resampled and normalised).
        modality: the input's DICOM Modality, when it has one.
    """
    if not fingerprint:
        return Conformity(True, [], checked=False)
    reasons = []
    if (reason := _modality_reason(fingerprint, modality)) is not None:
        reasons.append(reason)
    spacing, extent = _ras_spacing_and_extent(affine, shape)
    lo, hi = fingerprint["spacing_min"], fingerprint["spacing_max"]
    if any(s < a / SPACING_FACTOR or s > b * SPACING_FACTOR for s, a, b in zip(spacing, lo, hi)):
        reasons.append(f"spacing {_fmt(spacing)} mm, trained on {_fmt(fingerprint['spacing_median'])} mm")
    lo, hi = fingerprint["extent_min"], fingerprint["extent_max"]
    if any(e < a / EXTENT_FACTOR or e > b * EXTENT_FACTOR for e, a, b in zip(extent, lo, hi)):
        trained = " x ".join(f"{a:.0f}-{b:.0f}" for a, b in zip(lo, hi))
        reasons.append(f"field of view {_fmt(extent, 0)} mm, trained on {trained} mm")
    oblique = obliquity_deg(affine)
    if oblique > float(fingerprint.get("obliquity_max", 0.0)) + OBLIQUITY_MARGIN_DEG:
        reasons.append(f"oblique acquisition ({oblique:.0f} degrees off the patient axes), trained on at most "
                       f"{float(fingerprint.get('obliquity_max', 0.0)):.0f}")
    names = list(fingerprint.get("modalities", {}).values())
    for c, (stats, pct) in enumerate(zip(fingerprint.get("intensity", []), intensity_percentiles(normalised))):
        distance = intensity_distance(pct, stats["median"], stats["scale"])
        if distance > INTENSITY_FACTOR * stats["max_distance"] and not math.isnan(distance):
            name = names[c] if c < len(names) else f"channel {c}"
            reasons.append(f"intensity distribution unlike training {name} (distance {distance:.1f}, "
                           f"training cases at most {stats['max_distance']:.1f})")
    return Conformity(not reasons, reasons)
