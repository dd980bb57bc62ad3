"""``scripts/member_agreement.py``: the pairwise Dice between independently trained members' saved masks, on
real hippocampus label maps, and the members it refuses (one that trained on a scored case)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from pipeline.evaluation.quality_review import write_quality_records
from pipeline.quality import Conformity, add_true_dice, case_record
from tests.test_scripts import _load_script

NAMES = {1: "Anterior", 2: "Posterior"}


def _member(work: Path, hippocampus: Path, cases: list[str], train: list[str], change: dict[str, int],
            fold: int = 0) -> Path:
    """One member's finished evaluation of ``fold``: its masks (the reference, with the posterior part eroded
    ``change[case]`` times) and records as evaluation writes them."""
    folder = work / "evaluation" / f"fold_{fold}"
    (folder / "predictions").mkdir(parents=True)
    folds = [{"train": [], "val": []}] * fold + [{"train": train, "val": cases}]
    (work / "splits.json").write_text(json.dumps({"folds": folds}))
    records, rows = [], ["case,Anterior,Posterior"]
    for case in cases:
        image = nib.load(str(hippocampus / "labelsTr" / f"{case}.nii.gz"))
        labels = np.asarray(image.dataobj).astype(np.uint8)
        for _ in range(change.get(case, 0)):
            eroded = ndimage.binary_erosion(labels == 2)
            labels[(labels == 2) & ~eroded] = 0
        nib.save(nib.Nifti1Image(labels, image.affine), str(folder / "predictions" / f"{case}.nii.gz"))
        signals = {v: {"soft_dice": 0.9, "agreement": 0.95} for v in NAMES}
        record = case_record(case, labels, image.affine, NAMES, signals, None, Conformity(True, [], True), {}, {},
                             {"mask": None})
        records.append(add_true_dice(record, {"Anterior": 0.9, "Posterior": 0.8}))
        rows.append(f"{case},0.9,0.8")
    write_quality_records(records, folder)
    (folder / "cases.csv").write_text("\n".join(rows) + "\n")
    return folder


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def test_members_masks_give_each_structure_its_pairwise_dice(hippocampus: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    cases = sorted(p.name.removesuffix(".nii.gz") for p in (hippocampus / "labelsTr").glob("*.nii.gz"))[:3]
    train = ["hippocampus_900"]
    first = _member(tmp_path / "s0", hippocampus, cases, train, {})
    second = _member(tmp_path / "s1", hippocampus, cases, train, {cases[0]: 1})
    third = _member(tmp_path / "s2", hippocampus, cases, train, {cases[0]: 2, cases[1]: 1})
    script = _load_script("member_agreement")
    out = tmp_path / "members" / "fold_0"
    assert script.main([str(first), str(second), str(third), "--out", str(out)]) == 0
    assert "3 cases, 3 members" in capsys.readouterr().out
    records = {r["case"]: r for r in json.loads((out / "quality_records.json").read_text())["records"]}
    masks = {m: {c: np.asarray(nib.load(str(m / "predictions" / f"{c}.nii.gz")).dataobj) for c in cases}
             for m in (first, second, third)}
    for case in cases:
        for value, name in NAMES.items():
            pairs = [(first, second), (first, third), (second, third)]
            expected = np.mean([_dice(masks[a][case] == value, masks[b][case] == value) for a, b in pairs])
            got = records[case]["labels"][name]["signals"]["agreement_members"]
            assert got == pytest.approx(expected, abs=1e-9)
    # The eroded case agrees least on the eroded structure; the untouched one fully.
    post = [records[c]["labels"]["Posterior"]["signals"]["agreement_members"] for c in cases]
    assert post[0] < post[1] < post[2] == 1.0
    assert records[cases[0]]["labels"]["Anterior"]["signals"]["agreement_members"] == 1.0
    # The first member's true Dice is kept, and the estimate script reads the signal.
    assert records[cases[0]]["labels"]["Posterior"]["true_dice"] == 0.8
    estimate = _load_script("quality_estimate")
    loaded = estimate.load_split(out.parent)
    assert [c["signals"][2]["agreement_members"] for c in loaded] == pytest.approx(post)


def test_a_member_that_trained_on_a_scored_case_is_refused(hippocampus: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    cases = sorted(p.name.removesuffix(".nii.gz") for p in (hippocampus / "labelsTr").glob("*.nii.gz"))[:2]
    first = _member(tmp_path / "s0", hippocampus, cases, ["hippocampus_900"], {})
    # A fold ensemble's other fold: it trained on this fold's validation cases.
    other = _member(tmp_path / "fold1", hippocampus, cases, [cases[1], "hippocampus_900"], {})
    script = _load_script("member_agreement")
    out = tmp_path / "members"
    assert script.main([str(first), str(other), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trained on 1 of the scored cases" in err and str(other) in err
    assert not out.exists()
    # Members of other cases are refused too, as is a single member.
    fewer = _member(tmp_path / "s1", hippocampus, cases[:1], ["hippocampus_900"], {})
    assert script.main([str(first), str(fewer), "--out", str(out)]) == 2
    assert "cases differ" in capsys.readouterr().err
    assert script.main([str(first), "--out", str(out)]) == 2
    assert not out.exists()
