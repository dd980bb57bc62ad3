"""How far the members of a prediction agree: the mean pairwise Dice between their own masks, per structure.

The members are whatever made masks that can be compared at no extra training cost: the
mirrored passes of one network (each pass's own label map, before they are averaged), or the
models of a fold/seed ensemble (each model's label map of its mirror-averaged probabilities).
Zenk et al. (Medical Image Analysis 2025) found the pairwise Dice between an ensemble's masks
the strongest of the failure-detection signals they compared (``PairwiseDiceAggregator``).

Memory: a member costs one uint8 label map (a CT of 128^3 voxels: 2 MB a member, where its
logits would be 50 MB for 6 classes). Each pair's per-class intersections are counted when the
second of the two arrives, so :meth:`MaskAgreement.dice` is arithmetic on counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

#: the bincounts' length: a uint8 label map's values ...
_CLASSES = 256
#: ... of which the last stands for "the two members disagree here" (a label value of 255 is refused).
_DISAGREE = 255


class MaskAgreement:
    """Pairwise Dice between the label maps of several members, accumulated one member at a time.

    A structure absent from every member's mask is agreed on: 1.0, not a failure. A pair in
    which only one member has the structure scores 0 for that pair. With fewer than two members
    there is nothing to compare: NaN.
    """

    def __init__(self) -> None:
        self._maps: list[torch.Tensor] = []
        #: per member, voxels per class.
        self._sizes: list[torch.Tensor] = []
        #: per pair (i < j), voxels per class where both members say that class.
        self._overlaps: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def members(self) -> int:
        """How many label maps were added."""
        return len(self._maps)

    def add(self, labels: torch.Tensor) -> None:
        """One member's label map: its overlap with every earlier member is counted now.

        Args:
            labels: an integer label map (any shape, the same for every member; values < 255), on any device.

        Raises:
            ValueError: the map's size differs from the first member's, or it holds a value of 255 or more.
        """
        if labels.numel() and int(labels.max()) >= _DISAGREE:
            raise ValueError(f"label values must be below {_DISAGREE} (one is {int(labels.max())})")
        labels = labels.to(torch.uint8).reshape(-1)
        if self._maps and labels.shape != self._maps[0].shape:
            raise ValueError(f"a member's label map has {labels.numel()} voxels, the first had {self._maps[0].numel()}")
        j = len(self._maps)
        for i, other in enumerate(self._maps):
            # Every class's intersection in one pass: the voxels where the two disagree are counted under 255.
            # (Boolean indexing, labels[labels == other], copies the agreeing voxels out: 3x slower on a CT.)
            both = torch.where(labels == other, labels, _DISAGREE)
            self._overlaps[(i, j)] = torch.bincount(both, minlength=_CLASSES).cpu()
        self._sizes.append(torch.bincount(labels, minlength=_CLASSES).cpu())
        self._maps.append(labels)

    def dice(self, values: Iterable[int]) -> dict[int, float]:
        """Per label value, the mean over member pairs of the Dice between their masks of that label.

        Args:
            values: the foreground label values.

        Returns:
            label value -> mean pairwise Dice (1.0: absent from every member; NaN: fewer than two members).
        """
        out: dict[int, float] = {}
        for value in values:
            if len(self._maps) < 2:
                out[int(value)] = math.nan
                continue
            scores = []
            for (i, j), overlap in self._overlaps.items():
                total = int(self._sizes[i][value]) + int(self._sizes[j][value])
                scores.append(1.0 if total == 0 else 2.0 * int(overlap[value]) / total)
            out[int(value)] = float(sum(scores) / len(scores))
        return out

    def reset(self) -> None:
        """Forget every member (an engine that retries a volume after running out of memory starts again)."""
        self._maps, self._sizes, self._overlaps = [], [], {}


def mean_agreement(parts: Iterable[dict[int, float]]) -> dict[int, float]:
    """Per label value, the mean over several members' agreements that are known (NaN: none known).

    Args:
        parts: label value -> agreement, one mapping per source (e.g. each ensemble member's mirrored passes).
    """
    parts = list(parts)
    values = sorted({v for p in parts for v in p})
    out: dict[int, float] = {}
    for value in values:
        known = [p[value] for p in parts if value in p and not math.isnan(p[value])]
        out[value] = float(sum(known) / len(known)) if known else math.nan
    return out
