"""Choosing the keep-largest-component postprocessing on validation cases, as nnU-Net does.

Each kind of removal (see :mod:`pipeline.inference.postprocessing`) is applied only
where it raised the validation Dice. The decision is computed from per-case Dice
scores of four variants of each raw prediction (raw, foreground-only,
per-label-only, both). Removing components of one label never changes another
label's mask, so the per-label decisions are independent once the foreground
decision is taken.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.evaluation.metrics import dice_per_label, nanmean
from pipeline.inference import Postprocessing

VARIANTS = ("raw", "foreground", "labels", "foreground+labels")


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
