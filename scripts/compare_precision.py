"""Masks of one model predicted in float32 and in bfloat16: where they differ, and whether only at ties.

Predict the same cases twice, the float32 run with its probabilities, then compare::

    unet-pipeline predict --model M --precision float32 --save-probabilities --out F32 CASES...
    unet-pipeline predict --model M --precision bfloat16 --out BF16 CASES...
    python scripts/compare_precision.py F32 BF16

Per case it prints the voxels whose label differs, the Dice of each class between the two masks, and the
float32 margin (top probability minus the runner-up) at the differing voxels. bfloat16 keeps 8 bits of
mantissa (relative rounding 2^-9); a network of a dozen layers compounds that to about a percent of a
probability, so a difference "within bf16 rounding" is one where float32 itself was that close to a tie.
The last line says whether every differing voxel had a float32 margin below ``--tie`` (default 0.05).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np


def _mask(folder: Path, case: str) -> np.ndarray:
    return np.asarray(nib.load(str(folder / f"{case}.nii.gz")).dataobj)


def compare_case(f32: Path, bf16: Path, case: str) -> dict[str, float]:
    """One case's differences between the float32 and bfloat16 masks.

    Args:
        f32: the float32 predict output folder (with ``CASE_probabilities.nii.gz``).
        bf16: the bfloat16 predict output folder.
        case: the case name (``CASE.nii.gz`` in both).

    Returns:
        ``voxels`` differing, their ``share`` of the case, ``dice_min`` over the classes present in either
        mask, and ``margin_max`` / ``margin_median``: float32's top-two probability gap at those voxels.
    """
    a, b = _mask(f32, case), _mask(bf16, case)
    differ = a != b
    dices = []
    for value in sorted(set(np.unique(a)) | set(np.unique(b)) - {0}):
        x, y = a == value, b == value
        dices.append(2.0 * np.logical_and(x, y).sum() / max(1, x.sum() + y.sum()))
    margins = np.zeros(0)
    probabilities = f32 / f"{case}_probabilities.nii.gz"
    if differ.any() and probabilities.is_file():
        prob = np.asarray(nib.load(str(probabilities)).dataobj, dtype=np.float32)[differ]  # (voxels, classes)
        top2 = np.sort(prob, axis=-1)[:, -2:]
        margins = top2[:, 1] - top2[:, 0]
    return {"voxels": int(differ.sum()), "share": float(differ.mean()), "dice_min": float(min(dices, default=1.0)),
            "margin_max": float(margins.max()) if margins.size else 0.0,
            "margin_median": float(np.median(margins)) if margins.size else 0.0}


def main(argv: list[str] | None = None) -> int:
    """Compare every case of two predict output folders.

    Args:
        argv: command-line arguments (see the module docstring).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("f32", type=Path, help="float32 predict output (with --save-probabilities)")
    parser.add_argument("bf16", type=Path, help="bfloat16 predict output")
    parser.add_argument("--tie", type=float, default=0.05, help="float32 margin counted as a tie")
    args = parser.parse_args(argv)
    cases = sorted(p.name.removesuffix(".nii.gz") for p in args.f32.glob("*.nii.gz")
                   if not p.name.endswith("_probabilities.nii.gz") and (args.bf16 / p.name).is_file())
    if not cases:
        print(f"error: no case is in both {args.f32} and {args.bf16}", file=sys.stderr)
        return 2
    rows = [(c, compare_case(args.f32, args.bf16, c)) for c in cases]
    print("case                 differing voxels    share   min class Dice   f32 margin max / median")
    for case, r in rows:
        print(f"{case:<20} {r['voxels']:>16d} {r['share']:>8.2e} {r['dice_min']:>16.5f}   "
              f"{r['margin_max']:.4f} / {r['margin_median']:.4f}")
    worst = max(r["margin_max"] for _, r in rows)
    total = sum(r["voxels"] for _, r in rows)
    print(f"{len(rows)} cases, {total} differing voxels, lowest class Dice {min(r['dice_min'] for _, r in rows):.5f}; "
          f"every difference at a float32 tie (margin < {args.tie}): {'yes' if worst < args.tie else 'no'} "
          f"(largest margin {worst:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
