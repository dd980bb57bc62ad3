"""Agreement between independently trained members, from their finished evaluations of one fold.

Each MEMBER is the evaluation folder of one model (``WORK/evaluation/fold_K``: its ``predictions/``
label maps and its ``quality_records.json``), all of the same validation cases and none trained on
them: for example the same fold trained with two or three ``train.seed`` values. Per case and
structure it computes ``agreement_members``, the mean pairwise Dice between the members' masks
(:class:`pipeline.quality.agreement.MaskAgreement`, as an ensemble's evaluation records it), and
writes the first member's records with that signal filled in to ``OUT/quality_records.json``. The
true Dice stays the first member's: the estimate is for the model that would be shipped, the
other members serve only to disagree with it. ``scripts/quality_estimate.py OUT`` then scores the
agreement against today's estimate on the same cases.

Why not the folds of ``unet-pipeline ensemble``: a validation case of fold k trained the other
folds' models, so their agreement on it is biased high. Every member here is refused unless its
work directory's ``splits.json`` keeps every scored case out of its training cases.

Usage::

    python scripts/member_agreement.py unet-work/hippo-seed0/evaluation/fold_0 \\
        unet-work/hippo-seed1/evaluation/fold_0 --out unet-work/hippo-members/fold_0
    python scripts/quality_estimate.py unet-work/hippo-members
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.quality.agreement import MaskAgreement  # noqa: E402


class MemberError(ValueError):
    """A member cannot be compared (missing files, other cases, or it trained on a scored case)."""


def _records(folder: Path) -> dict[str, Any]:
    file = folder / "quality_records.json"
    if not file.is_file():
        raise MemberError(f"{folder}: no quality_records.json (not a finished evaluation)")
    return json.loads(file.read_text())


def training_cases(folder: Path) -> set[str] | None:
    """The cases the member's model trained on, from its work directory's ``splits.json`` (None: not found).

    Args:
        folder: ``WORK/evaluation/fold_K``.
    """
    name = folder.resolve().name
    splits = folder.resolve().parents[1] / "splits.json"
    if not name.startswith("fold_") or not splits.is_file():
        return None
    folds = json.loads(splits.read_text())["folds"]
    return set(folds[int(name.removeprefix("fold_"))]["train"])


def member_agreement(folders: Sequence[Path]) -> dict[str, Any]:
    """The first member's records with every label's ``agreement_members`` computed from all members' masks.

    Args:
        folders: two or more evaluation folders of the same cases.

    Raises:
        MemberError: fewer than two members, different cases, a missing mask, an unknown training set, or a member
            that trained on a case it is scored on.
    """
    if len(folders) < 2:
        raise MemberError("give at least two members' evaluation folders")
    records = [_records(f) for f in folders]
    cases = [sorted(r["case"] for r in rec["records"]) for rec in records]
    for folder, own in zip(folders[1:], cases[1:]):
        if own != cases[0]:
            raise MemberError(f"{folder}: its cases differ from {folders[0]}'s "
                              f"({len(set(own) ^ set(cases[0]))} not in both)")
    scored = set(cases[0])
    for folder in folders:
        seen = training_cases(folder)
        if seen is None:
            raise MemberError(f"{folder}: no WORK/splits.json above it to show which cases its model trained on")
        if seen & scored:
            raise MemberError(f"{folder}: its model trained on {len(seen & scored)} of the scored cases "
                              "(a fold ensemble's members saw each other's validation cases)")
    out = json.loads(json.dumps(records[0]))
    for record in out["records"]:
        agreement = MaskAgreement()
        for folder in folders:
            mask = folder / "predictions" / f"{record['case']}.nii.gz"
            if not mask.is_file():
                raise MemberError(f"{mask}: missing (the evaluation kept no prediction of this case)")
            agreement.add(torch.from_numpy(np.asarray(nib.load(str(mask)).dataobj).astype(np.uint8)))
        dice = agreement.dice(int(e["value"]) for e in record["labels"].values())
        for entry in record["labels"].values():
            entry.setdefault("signals", {})["agreement_members"] = dice[int(entry["value"])]
    out["members"] = [str(f) for f in folders]
    out["member_mean_dice"] = [_mean_dice(rec["records"]) for rec in records]
    return out


def _mean_dice(records: Sequence[dict[str, Any]]) -> float:
    """A member's mean true Dice: over its cases, each the mean over its structures."""
    return float(np.mean([np.nanmean([float(e["true_dice"]) for e in r["labels"].values()
                                      if e.get("true_dice") is not None]) for r in records]))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, compute, write ``OUT/quality_records.json`` atomically and print each member's Dice.

    Args:
        argv: the command line (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("members", nargs="+", type=Path, help="evaluation folders (WORK/evaluation/fold_K)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the records with agreement_members")
    args = parser.parse_args(argv)
    try:
        records = member_agreement(args.members)
    except MemberError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "quality_records.json.tmp"
    tmp.write_text(json.dumps(records, indent=1))
    tmp.replace(args.out / "quality_records.json")
    for folder, dice in zip(args.members, records["member_mean_dice"]):
        print(f"{folder}: mean Dice {dice:.4f}")
    print(f"{len(records['records'])} cases, {len(args.members)} members: {args.out / 'quality_records.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
