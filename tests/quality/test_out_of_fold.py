"""``scripts/out_of_fold.py``: the queue of out-of-fold runs (order, what counts as done) and the assembly of the
finished ones into what ``scripts/quality_estimate.py`` scores, on real hippocampus label maps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.quality.test_member_agreement import _member
from tests.test_scripts import _load_script


def test_the_queue_runs_every_fold_of_a_split_before_the_next_and_seeds_of_a_fold_together(tmp_path: Path) -> None:
    oof = _load_script("out_of_fold")
    runs = oof.queue(["left_atrium"], [0, 1], [0, 1], 2)
    assert [(r.split_seed, r.fold, r.train_seed) for r in runs] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    cmd = runs[5].command(tmp_path, 20, "unet-pipeline")
    sets = {cmd[i + 1] for i, part in enumerate(cmd) if part == "--set"}
    assert sets == {"train.time_budget_minutes=20", "data.split_seed=1", "data.fold=0", "train.seed=1"}
    assert cmd[cmd.index("--work-dir") + 1] == str(tmp_path / "left_atrium" / "split1" / "seed1" / "fold0")
    assert cmd[2].endswith("configs/left_atrium.yaml")


def test_finished_runs_are_assembled_per_split_singly_and_as_members(hippocampus: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    oof = _load_script("out_of_fold")
    ids = sorted(p.name.removesuffix(".nii.gz") for p in (hippocampus / "labelsTr").glob("*.nii.gz"))
    root = tmp_path / "oof"
    runs = oof.queue(["hippocampus"], [0], [0, 1], 3)
    by = {(r.fold, r.train_seed): r for r in runs}
    # Fold 0: two seeds, the second disagreeing on one case. Fold 1: seed 0 only. Fold 2: nothing yet.
    # Fold 0's cases are ids[:2]; fold 1's ids[2:4].
    _member(by[0, 0].work_dir(root), hippocampus, ids[:2], ids[4:6], {})
    _member(by[0, 1].work_dir(root), hippocampus, ids[:2], ids[4:6], {ids[0]: 2})
    _member(by[1, 0].work_dir(root), hippocampus, ids[2:4], ids[4:6], {}, fold=1)
    assert [r.done(root) for r in runs] == [True, True, True, False, False, False]

    assert oof.main(["--root", str(root), "--tasks", "hippocampus", "--split-seeds", "0", "--train-seeds", "0", "1",
                     "--folds", "3", "--assemble"]) == 0
    out = capsys.readouterr().out
    assert "3 of 6 runs done" in out and "single folds [0, 1]" in out and "members folds [0]" in out
    base = root / "hippocampus" / "split0"
    for fold, run in ((0, by[0, 0]), (1, by[1, 0])):
        copied = base / "single" / f"fold_{fold}" / "quality_records.json"
        assert copied.read_bytes() == (run.evaluation(root) / "quality_records.json").read_bytes()
    members = json.loads((base / "members" / "fold_0" / "quality_records.json").read_text())["records"]
    agreement = {r["case"]: r["labels"]["Posterior"]["signals"]["agreement_members"] for r in members}
    assert agreement[ids[0]] < 1.0 == agreement[ids[1]]
    assert not (base / "members" / "fold_1").exists()
    # The estimate script reads both folds of the single model as one split, cross-fitted by fold.
    assert len(_load_script("quality_estimate").load_split(base / "single")) == 4


def test_a_member_that_trained_on_the_fold_s_cases_is_not_assembled(hippocampus: Path, tmp_path: Path) -> None:
    oof = _load_script("out_of_fold")
    ids = sorted(p.name.removesuffix(".nii.gz") for p in (hippocampus / "labelsTr").glob("*.nii.gz"))
    root = tmp_path / "oof"
    runs = oof.queue(["hippocampus"], [0], [0, 1], 1)
    _member(runs[0].work_dir(root), hippocampus, ids[:2], ids[4:6], {})
    _member(runs[1].work_dir(root), hippocampus, ids[:2], [ids[1], *ids[4:6]], {})  # trained on a scored case
    lines = oof.assemble(root, runs)
    assert any("members not assembled" in line and "trained on 1 of the scored cases" in line for line in lines)
    assert not (root / "hippocampus" / "split0" / "members" / "fold_0").exists()
    assert (root / "hippocampus" / "split0" / "single" / "fold_0" / "quality_records.json").is_file()
