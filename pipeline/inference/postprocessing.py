"""Keep-the-largest-connected-component postprocessing (decided on validation cases, see
:mod:`pipeline.evaluation.postprocessing_choice`).

Two kinds of removal:

1. **All foreground together**: every foreground voxel outside the largest connected
   foreground component becomes background (removes islands whatever their label).
2. **Per label**: for each label, voxels of that label outside its largest component
   become background.

Connectivity is full (26 neighbours in 3D), as nnU-Net's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a boolean mask (full connectivity); empty stays empty.

    Args:
        mask: boolean array.
    """
    components, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if count <= 1:
        return mask.copy()
    # Counted a slab at a time: bincount widens its input to int64, 0.4 GB at once for a CT on the network's grid.
    sizes = np.zeros(count + 1, dtype=np.int64)
    step = max(1, (1 << 22) // max(1, int(np.prod(components.shape[1:]))))
    for start in range(0, components.shape[0], step):
        sizes += np.bincount(components[start:start + step].ravel(), minlength=count + 1)
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
