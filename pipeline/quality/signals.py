"""What a prediction says about its own quality, from the passes already run (no extra network pass).

Per label, on the network's grid (where the passes were averaged):

* ``spread``: the mean disagreement of the mirrored passes (and overlapping windows, and
  fold models) over the predicted structure and a one-voxel ring around it: the
  standard deviation of the logit vectors, from :meth:`SlidingWindowInferer.with_spread`.
* ``boundary_entropy``: the mean normalised entropy of the averaged probabilities on the
  structure's boundary band (one voxel inside and outside its surface).
* ``soft_dice``: the Dice the model itself expects, between its averaged probabilities
  and its label map.
* ``expected_error``: the probability mass on the wrong side of the label map (inside
  the structure, the other classes; outside, this class) per voxel of the structure.
* ``voxels``: the structure's size on the network grid (small structures lose more Dice
  to the same boundary error).
* ``fragments``: the share of the structure's voxels outside its largest connected component
  (full connectivity, as the postprocessing's; 0 for one piece): a structure in pieces is
  often a structure found in the wrong places.
* ``volume_z``: how far the structure's volume lies from the training cases' volumes of that
  label, in robust standard deviations of the log volume (NaN for a model whose fingerprint
  predates the volumes, see :func:`pipeline.data.label_volume_stats`).
* ``agreement``: the mean pairwise Dice between the mirrored passes' own masks (each pass's
  argmax; for an ensemble, averaged over its models), :class:`pipeline.quality.agreement.MaskAgreement`:
  1.0 where every pass agrees, also for a structure no pass found; NaN without mirroring.
* ``agreement_members``: the same between the masks of an ensemble's models (NaN for one model).

Which of them predict the true Dice, and with what weight, is fitted on validation
(:mod:`pipeline.quality.calibration`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

SIGNALS = ("spread", "boundary_entropy", "soft_dice", "expected_error", "voxels", "fragments", "volume_z", "agreement",
           "agreement_members")
#: the signals that compare the members' masks: known for a structure nobody found too (every member agrees on it).
AGREEMENT_SIGNALS = ("agreement", "agreement_members")


def _dilate(mask: torch.Tensor) -> torch.Tensor:
    """The mask grown by the full 3x3(x3) neighbourhood, one axis at a time in booleans.

    The box is separable; in booleans it costs two mask-sized buffers, where a float max-pool
    cost ten times that on a whole CT (0.4 GB at once on a 390x390x346 grid).
    """
    out = mask.clone()
    for axis in range(mask.dim()):
        n = out.shape[axis]
        before = out.clone()
        out.narrow(axis, 1, n - 1).logical_or_(before.narrow(axis, 0, n - 1))
        out.narrow(axis, 0, n - 1).logical_or_(before.narrow(axis, 1, n - 1))
    return out


def _bbox(mask: torch.Tensor, margin: int = 2) -> tuple[slice, ...]:
    """The bounding box of ``mask`` grown by ``margin`` voxels: the signals only need that part of the volume."""
    box = []
    for axis, n in enumerate(mask.shape):
        # Per axis, from the mask's projection: nonzero() would list every voxel's index in int64 (0.5 GB for a
        # structure of 20 million voxels).
        hit = mask.any(dim=tuple(d for d in range(mask.dim()) if d != axis)).nonzero()
        a, b = int(hit[0]), int(hit[-1])
        box.append(slice(max(0, a - margin), min(n, b + margin + 1)))
    return tuple(box)


def _band_entropy(probabilities: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
    """Normalised entropy (0..1) of each voxel of ``band``, a class at a time (the band of a fragmented map can be most
    of a CT: three buffers of the band's size at most).
    """
    total: torch.Tensor | None = None
    for p in probabilities:
        q = p[band]
        t = q.clamp_min(1e-12).log_().mul_(q)
        total = t.neg_() if total is None else total.sub_(t)
    assert total is not None
    return total / math.log(max(2, probabilities.shape[0]))


def fragments(mask: np.ndarray) -> float:
    """The share of ``mask``'s voxels outside its largest connected component (full connectivity; 0: one piece).

    Args:
        mask: a boolean array, best cropped to the structure's bounding box (the labelling is 2 bytes a voxel of it).
    """
    from scipy import ndimage  # here: the signals module is imported by every start-up, labelling only by predictions

    structure = np.ones((3,) * mask.ndim, dtype=bool)
    try:
        # uint16 halves int32's buffer (70 MB less for a structure spanning most of a CT), and a predicted structure
        # in over 65,535 pieces is rare enough to pay for labelling twice.
        components, count = ndimage.label(mask, structure=structure, output=np.uint16)
    except RuntimeError:  # too many pieces for uint16
        components, count = ndimage.label(mask, structure=structure)
    if count <= 1:
        return 0.0
    # Counted a slab at a time: bincount widens its input to int64 (8 bytes per voxel of the crop at once).
    sizes = np.zeros(count + 1, dtype=np.int64)
    step = max(1, (1 << 22) // max(1, int(np.prod(components.shape[1:]))))
    for start in range(0, components.shape[0], step):
        sizes += np.bincount(components[start:start + step].ravel(), minlength=count + 1)
    total = int(sizes[1:].sum())
    return float(total - int(sizes[1:].max())) / total


def volume_z(volume_ml: float, reference: Mapping[str, float] | None) -> float:
    """How far a volume lies from the training volumes: ``|log(volume) - median| / scale`` (NaN: no reference).

    Args:
        volume_ml: the structure's volume (mL).
        reference: ``median`` and ``scale`` of the training cases' log volumes of the label
            (:func:`pipeline.data.label_volume_stats`); ``None``: not known (an older model).
    """
    if reference is None or not volume_ml > 0:
        return math.nan
    return abs(math.log(volume_ml) - float(reference["median"])) / float(reference["scale"])


@torch.no_grad()
def quality_signals(
    probabilities: torch.Tensor, labels: torch.Tensor, spread: torch.Tensor | None, values: Sequence[int],
    volumes: Mapping[str, Any] | None = None, agreements: Mapping[str, Mapping[int, float]] | None = None,
) -> dict[int, dict[str, float]]:
    """The quality signals of each foreground label.

    Args:
        probabilities: ``(classes, X, Y, Z)`` averaged softmax on the network grid.
        labels: ``(X, Y, Z)`` their argmax.
        spread: ``(X, Y, Z)`` disagreement of the passes (``None``: a single pass, taken as 0).
        values: the foreground label values.
        volumes: the training fingerprint's ``volumes`` (:func:`pipeline.data.label_volume_stats`: the network
            grid's ``voxel_ml`` and per label the log-volume ``median`` and ``scale``); ``None``: ``volume_z`` is NaN.
        agreements: signal name (:data:`AGREEMENT_SIGNALS`) -> label value -> the members' agreement
            (:class:`~pipeline.quality.agreement.MaskAgreement`); a name left out is NaN.

    Returns:
        label value -> signal name -> value; an empty structure has ``voxels`` 0 and NaN signals.
    """
    out: dict[int, dict[str, float]] = {}
    per_label = (volumes or {}).get("labels", {})
    for value in values:
        agreed = {k: float((agreements or {}).get(k, {}).get(int(value), math.nan)) for k in AGREEMENT_SIGNALS}
        mask = labels == value
        voxels = int(mask.sum())
        if voxels == 0:
            out[int(value)] = {**{k: math.nan for k in SIGNALS}, "voxels": 0.0, **agreed}
            continue
        box = _bbox(mask)
        m = mask[box]
        ring = _dilate(m)
        inner = ~_dilate(~m)
        band = ring & ~inner
        p = probabilities[(slice(None), *box)].float()
        pc = p[value]
        inside = float(pc[m].sum())
        total = float(probabilities[value].float().sum())
        out[int(value)] = {
            "spread": float(spread[box][ring].mean()) if spread is not None else 0.0,
            "boundary_entropy": float(_band_entropy(p, band).mean()),
            "soft_dice": 2 * inside / (total + voxels),
            "expected_error": ((voxels - inside) + (total - inside)) / voxels,
            "voxels": float(voxels),
            # On the crop: a label of the whole grid's size costs int32 of the grid, a small one next to nothing.
            "fragments": fragments(m.cpu().numpy()),
            "volume_z": volume_z(voxels * float(volumes["voxel_ml"]), per_label.get(str(value))) if volumes else math.nan,
            **agreed,
        }
    return out
