"""Label pairs that mirror onto each other (left/right organs), found at planning and carried by the plan.

Mirroring a scan along its left-right axis turns a left parotid into something that looks like
a right parotid. Augmentation and test-time mirroring flip along every axis, so a flipped pass
must swap such labels, or a network learns both sides as one and test-time mirroring averages
the left organ's output with the right's. The plan finds the pairs two ways:

* **names**: ``RightParotid``/``LeftParotid``, ``Parotid_L``/``Parotid_R``, ``left kidney``/``right kidney``
  (the same words once one side word, ``left``/``right``/``l``/``r``/``lt``/``rt``, is taken out);
* **label maps**: on a sample of preprocessed training label maps, class A reflected along an
  axis (about the plane halfway between the two classes, its other coordinates moved onto B's)
  overlaps class B, A lies on the same side of B in (nearly) every case, and A and B differ
  mainly along that axis (for a pair found without names: with a gap between them along it, at least
  half their size). This gives a named pair its axis in the preprocessed array (the
  orientation code cannot: a file whose affine holds no direction says nothing about left and
  right) and finds unnamed pairs; those must also straddle the middle of the array.

``plan["mirror_pairs"]`` lists them per axis of the preprocessed (reoriented) array; a plan
without the key (older models) has none, and everything mirrors as before.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_SIDES = {"left": "L", "l": "L", "lt": "L", "right": "R", "r": "R", "rt": "R"}
#: How many training label maps the check reads (evenly spread over the cases).
SAMPLE_CASES = 8
#: Median overlap (Dice) of reflected A with B for a named pair to count as confirmed on an axis.
MIN_OVERLAP_NAMED = 0.2
#: Stricter for a pair found by the label maps alone.
MIN_OVERLAP_UNNAMED = 0.4
#: Fraction of the cases in which A lies on the same side of B along the axis.
MIN_SAME_SIDE = 0.8


def _side_and_rest(name: str) -> tuple[str, tuple[str, ...]] | None:
    """``("L", ("parotid",))`` for ``Parotid_L``; ``None`` when the name has no (or two) side words."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    tokens = [t.lower() for t in re.split(r"[^A-Za-z0-9]+", spaced) if t]
    sides = [i for i, t in enumerate(tokens) if t in _SIDES]
    if len(sides) != 1 or len(tokens) < 2:
        return None
    side = _SIDES[tokens[sides[0]]]
    return side, tuple(t for i, t in enumerate(tokens) if i != sides[0])


def named_pairs(labels: Mapping[int, str]) -> list[tuple[int, int]]:
    """Label pairs whose names differ only by left/right, as ``(a, b)`` with ``a < b``.

    Args:
        labels: label value -> name (background included or not).
    """
    by_rest: dict[tuple[str, ...], dict[str, list[int]]] = {}
    for value, name in labels.items():
        parsed = _side_and_rest(str(name))
        if parsed is not None and int(value) != 0:
            by_rest.setdefault(parsed[1], {}).setdefault(parsed[0], []).append(int(value))
    pairs = []
    for sides in by_rest.values():
        if len(sides.get("L", [])) == 1 and len(sides.get("R", [])) == 1:
            pairs.append(tuple(sorted((sides["L"][0], sides["R"][0]))))
    return sorted(pairs)  # type: ignore[arg-type]


def _reflected_overlap(a: np.ndarray, b_mask: np.ndarray, axis: int, ca: np.ndarray, cb: np.ndarray) -> float:
    """Dice of A's voxels reflected along ``axis`` about the plane between the centroids (other axes moved onto B's) with B."""
    coords = a.astype(np.float64).copy()
    coords[:, axis] = (ca[axis] + cb[axis]) - coords[:, axis]
    for other in range(coords.shape[1]):
        if other != axis:
            coords[:, other] += cb[other] - ca[other]
    idx = np.rint(coords).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < np.asarray(b_mask.shape)), axis=1)
    hits = int(b_mask[tuple(idx[inside].T)].sum())
    return 2.0 * hits / (len(a) + int(b_mask.sum()))


def pair_evidence(label_maps: Sequence[np.ndarray], spacing: Sequence[float], values: Sequence[int]) -> dict[tuple, dict]:
    """Per ``(a, b, axis)``: how well class ``a`` mirrored along ``axis`` lands on class ``b`` over the label maps.

    Args:
        label_maps: ``(X, Y, Z)`` integer label maps in the preprocessed array's axes.
        spacing: the voxel spacing in mm (the plan's target spacing).
        values: the foreground label values to consider.

    Returns:
        ``{(a, b, axis): {"overlap", "same_side", "gap", "along", "centred", "cases"}}`` (medians over the cases
        holding both): reflected Dice; the fraction of cases in which ``a`` lies on the side of ``b`` it most often
        does; the gap between their extents along the axis over their mean extent (negative: they overlap); the
        separation along the axis over the separation along the others; the pair's midplane off the array's
        middle, over their separation.
    """
    sp = np.asarray(spacing, dtype=np.float64)
    stats: dict[tuple, dict[str, list[float]]] = {}
    for lab in label_maps:
        voxels = {v: np.argwhere(lab == v) for v in values}
        voxels = {v: c for v, c in voxels.items() if len(c)}
        centroids = {v: c.mean(0) for v, c in voxels.items()}
        for a, b in itertools.combinations(sorted(voxels), 2):
            diff = (centroids[a] - centroids[b]) * sp
            b_mask = lab == b
            for axis in range(lab.ndim):
                along = abs(diff[axis])
                across = float(np.linalg.norm(np.delete(diff, axis)))
                mid = (centroids[a][axis] + centroids[b][axis]) / 2
                s = stats.setdefault((a, b, axis), {"overlap": [], "side": [], "gap": [], "along": [], "centred": []})
                ra, rb = voxels[a][:, axis], voxels[b][:, axis]
                extent = (ra.max() - ra.min() + rb.max() - rb.min() + 2) / 2
                s["gap"].append(float(max(ra.min(), rb.min()) - min(ra.max(), rb.max()) - 1) / extent)
                s["overlap"].append(_reflected_overlap(voxels[a], b_mask, axis, centroids[a], centroids[b]))
                s["side"].append(float(np.sign(diff[axis])))
                s["along"].append(along / max(across, 1e-6))
                s["centred"].append(abs(mid - (lab.shape[axis] - 1) / 2) * sp[axis] / max(along, 1e-6))
    out = {}
    for key, s in stats.items():
        sides = np.asarray(s["side"])
        out[key] = {
            "overlap": float(np.median(s["overlap"])),
            "same_side": float(max(np.mean(sides > 0), np.mean(sides < 0))),
            "gap": float(np.median(s["gap"])),
            "along": float(np.median(s["along"])),
            "centred": float(np.median(s["centred"])),
            "cases": len(sides),
        }
    return out


def _mirrors(e: dict[str, Any], named: bool) -> bool:
    # Blob-like organs of similar size overlap well once their centroids meet (brainstem and a parotid
    # reach 0.6 on hn_ct): what tells a mirror pair is that they lie apart along one axis only.
    if e["same_side"] < MIN_SAME_SIDE or e["along"] < (2.0 if named else 4.0):
        return False
    if named:
        return e["overlap"] >= MIN_OVERLAP_NAMED
    # Two parts of one organ (anterior and posterior hippocampus) touch; a left/right pair lies apart.
    return e["overlap"] >= MIN_OVERLAP_UNNAMED and e["centred"] < 0.25 and e["gap"] >= 0.5


def find_mirror_pairs(
    labels: Mapping[int, str], label_maps: Sequence[np.ndarray], spacing: Sequence[float], orientation: str,
) -> list[dict[str, Any]]:
    """The plan's ``mirror_pairs``: label pairs that mirror onto each other, each with its array axis.

    A named pair takes the axis the label maps confirm; where none does, the axis along which the
    two lie apart most consistently, and with no label map holding both, the orientation's
    left-right axis (a warning says so). An unnamed pair must pass the stricter label-map check.

    Args:
        labels: label value -> name.
        label_maps: a sample of preprocessed training label maps ``(X, Y, Z)``.
        spacing: their voxel spacing in mm.
        orientation: the plan's axis codes (e.g. ``RAS``), the fallback for named pairs.
    """
    values = sorted(int(v) for v in labels if int(v) != 0)
    evidence = pair_evidence(label_maps, spacing, values)
    named = named_pairs(labels)
    pairs: list[dict[str, Any]] = []
    for a, b in named:
        on_axes = [(e["overlap"], axis) for (x, y, axis), e in evidence.items() if (x, y) == (a, b) and _mirrors(e, True)]
        if on_axes:
            axis, found_by = max(on_axes)[1], "names and label maps"
        else:
            apart = [(e["same_side"], e["along"], axis) for (x, y, axis), e in evidence.items() if (x, y) == (a, b)]
            if apart:
                axis, found_by = max(apart)[2], "names (the label maps do not show them as mirror images)"
            else:
                axis = next(i for i, code in enumerate(orientation.upper()) if code in "LR")
                found_by = "names (no label map holds both)"
            logger.warning("labels %s and %s: left/right by name, swapped along axis %d (%s)",
                           labels.get(a), labels.get(b), axis, found_by)
        pairs.append(_entry(a, b, axis, found_by, labels, evidence))
    taken = {v for p in pairs for v in p["labels"]}
    for (a, b, axis), e in sorted(evidence.items()):
        if a not in taken and b not in taken and _mirrors(e, False):
            pairs.append(_entry(a, b, axis, "label maps", labels, evidence))
            taken |= {a, b}
    return pairs


def _entry(a: int, b: int, axis: int, found_by: str, labels: Mapping[int, str], evidence: dict) -> dict[str, Any]:
    e = evidence.get((a, b, axis), {})
    return {"axis": int(axis), "labels": [int(a), int(b)], "names": [str(labels.get(a)), str(labels.get(b))],
            "found_by": found_by, "overlap": round(float(e.get("overlap", float("nan"))), 3),
            "cases": int(e.get("cases", 0))}


def mirror_swaps(plan: Mapping[str, Any] | None) -> dict[int, list[tuple[int, int]]]:
    """Axis -> the label pairs a flip along it swaps, from a plan (``{}`` for plans without ``mirror_pairs``).

    Args:
        plan: the preprocessing plan (as stored in ``plans.json`` and every checkpoint).
    """
    swaps: dict[int, list[tuple[int, int]]] = {}
    for p in (plan or {}).get("mirror_pairs") or []:
        a, b = p["labels"]
        swaps.setdefault(int(p["axis"]), []).append((int(a), int(b)))
    return swaps


def flip_permutation(swaps: Mapping[int, Sequence[tuple[int, int]]], axes: Sequence[int],
                     num_classes: int) -> list[int] | None:
    """Where a flip along ``axes`` sends each class: ``perm[c]`` is the class that ``c`` becomes (``None``: no change).

    Swaps are their own inverse and pairs are disjoint, so the same list also takes a flipped pass's
    output channels back: ``out[perm]``.

    Args:
        swaps: from :func:`mirror_swaps`.
        axes: the flipped axes.
        num_classes: the number of classes (output channels), background included.
    """
    perm = list(range(num_classes))
    for axis in axes:
        for a, b in swaps.get(axis, ()):
            if a < num_classes and b < num_classes:
                perm[a], perm[b] = perm[b], perm[a]
    return None if perm == list(range(num_classes)) else perm
