"""Keep-the-largest-connected-component postprocessing, decided on validation cases as nnU-Net does.

Two kinds of removal, each applied only where it raised the validation Dice:

1. **All foreground together**: every foreground voxel outside the largest connected
   foreground component becomes background (removes islands whatever their label).
2. **Per label**: for each label, voxels of that label outside its largest component
   become background.

The decision is computed from per-case Dice scores of four variants of each raw
prediction (raw, foreground-only, per-label-only, both). Removing components of
one label never changes another label's mask, so the per-label decisions are
independent once the foreground decision is taken. Connectivity is full (26
neighbours in 3D), as nnU-Net's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from pipeline.metrics import dice_per_label, nanmean

VARIANTS = ("raw", "foreground", "labels", "foreground+labels")


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a boolean mask (full connectivity); empty stays empty.

    Args:
        mask: boolean array.
    """
    components, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


@dataclass(frozen=True)
class Postprocessing:
    """Which largest-component removals to apply to a predicted label map.

    Args:
        foreground: keep only the largest component of all foreground labels together.
        labels: label values whose largest component alone is kept.
    """

    foreground: bool = False
    labels: tuple[int, ...] = ()

    def apply(self, labels: np.ndarray) -> np.ndarray:
        """The post-processed label map (a new array; the input is left alone).

        Args:
            labels: integer label map.
        """
        out = labels.copy()
        if self.foreground:
            foreground = out > 0
            out[foreground & ~largest_component(foreground)] = 0
        for value in self.labels:
            mask = out == value
            out[mask & ~largest_component(mask)] = 0
        return out

    @property
    def active(self) -> bool:
        """Whether anything is removed at all."""
        return self.foreground or bool(self.labels)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for checkpoints, MLflow and JSON."""
        return {"foreground": self.foreground, "labels": [int(v) for v in self.labels]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Postprocessing:
        """Inverse of :meth:`to_dict`; ``None`` or ``{}`` means nothing is removed.

        Args:
            data: the stored decision.
        """
        data = data or {}
        return cls(bool(data.get("foreground", False)), tuple(int(v) for v in data.get("labels", [])))

    def describe(self, names: Mapping[int, str]) -> str:
        """One line for people: what is removed.

        Args:
            names: label value -> name.
        """
        parts = []
        if self.foreground:
            parts.append("all foreground: largest component only")
        parts += [f"{names.get(v, v)}: largest component only" for v in self.labels]
        return "; ".join(parts) if parts else "none (raw argmax)"


def variant_scores(pred: np.ndarray, truth: np.ndarray, labels: Sequence[int]) -> dict[str, dict[int, float]]:
    """Dice per label of the four postprocessing variants of one raw prediction.

    Args:
        pred: the raw predicted label map.
        truth: the reference label map.
        labels: foreground label values.
    """
    per_label = Postprocessing(labels=tuple(labels))
    foreground = Postprocessing(foreground=True).apply(pred)
    # apply() removes foreground islands first, then each label's: both steps on the foreground variant.
    variants = {"raw": pred, "foreground": foreground, "labels": per_label.apply(pred),
                "foreground+labels": per_label.apply(foreground)}
    return {name: dice_per_label(p, truth, labels) for name, p in variants.items()}


@dataclass
class Decision:
    """The chosen postprocessing and the validation means it was chosen on.

    Args:
        postprocessing: what to apply.
        mean_dice: mean Dice over labels of each variant (``VARIANTS``) on the validation cases.
        label_dice: per variant and label, the mean Dice.
    """

    postprocessing: Postprocessing
    mean_dice: dict[str, float] = field(default_factory=dict)
    label_dice: dict[str, dict[int, float]] = field(default_factory=dict)


def decide(cases: Sequence[Mapping[str, Mapping[int, float]]], labels: Sequence[int]) -> Decision:
    """Choose the removals that raise the validation Dice (strictly), nnU-Net's rule.

    First the all-foreground removal, kept when it raises the mean Dice over labels;
    then, on top of that choice, each label's removal, kept when it raises that
    label's mean Dice. Cases without a label (NaN Dice) are left out of its mean.

    Args:
        cases: per validation case, :func:`variant_scores`.
        labels: foreground label values.
    """
    label_dice = {v: {lab: nanmean([c[v][lab] for c in cases]) for lab in labels} for v in VARIANTS}
    mean_dice = {v: nanmean(list(label_dice[v].values())) for v in VARIANTS}
    foreground = bool(cases) and mean_dice["foreground"] > mean_dice["raw"]
    base, with_labels = ("foreground", "foreground+labels") if foreground else ("raw", "labels")
    chosen = tuple(lab for lab in labels if label_dice[with_labels][lab] > label_dice[base][lab])
    return Decision(Postprocessing(foreground, chosen), mean_dice, label_dice)
