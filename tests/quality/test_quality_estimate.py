"""``scripts/quality_estimate.py``: today's estimate and the agreement estimate cross-fitted by fold on the records
evaluations keep, with the statistics of :mod:`pipeline.quality.validation`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.evaluation.quality_review import write_quality_records
from pipeline.quality import Conformity, add_true_dice, case_record
from tests.test_scripts import _load_script


def _fold(folder: Path, n: int, seed: int, first: int, agreement: bool = True) -> Path:
    """One fold's evaluation: two structures whose true Dice follows the agreement; today's signals are noise."""
    rs = np.random.default_rng(seed)
    labels = np.zeros((6, 6, 6), dtype=np.uint8)
    labels[1:3] = 1
    labels[3:5] = 2
    records = []
    for i in range(n):
        signals, dice = {}, {}
        for value, name in ((1, "a"), (2, "b")):
            a = float(rs.uniform(0.6, 1.0))
            signals[value] = {"soft_dice": float(rs.uniform(0.8, 0.95)), "expected_error": float(rs.uniform(0.1, 0.3)),
                              "voxels": float(rs.uniform(900, 1100)), "agreement": a if agreement else math.nan,
                              "volume_z": 9.0 if i == 1 and value == 2 else 0.5, "fragments": 0.0}
            dice[name] = float(np.clip(0.2 + 0.75 * a + rs.normal(0, 0.02), 0, 1))
        conformity = Conformity(i != 0, ["spacing unlike training"] if i == 0 else [], True)
        record = case_record(f"case{first + i:03d}", labels, np.eye(4), {1: "a", 2: "b"}, signals, None, conformity,
                             {}, {}, {"mask": None})
        records.append(add_true_dice(record, dice))
    folder.mkdir(parents=True)
    return write_quality_records(records, folder)


def test_cross_fitted_by_fold_the_agreement_ranks_and_today_does_not(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    split = tmp_path / "seed0"
    for fold in range(3):
        _fold(split / "evaluation" / f"fold_{fold}", 14, seed=fold, first=100 * fold)
    old = tmp_path / "old"
    _fold(old / "evaluation" / "fold_0", 12, seed=9, first=0, agreement=False)
    script = _load_script("quality_estimate")
    out = tmp_path / "figures.json"
    assert script.main([str(split), str(old), "--resamples", "300", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "agreement (isotonic)" in printed and "no agreement in these records" in printed
    figures = json.loads(out.read_text())
    seed0 = figures[str(split)]
    assert seed0["folds"] == 3 and seed0["cases"] == 42
    agreement, today = seed0["estimators"]["agreement (isotonic)"], seed0["estimators"]["today (linear)"]
    assert agreement["spearman_low"] > 0.3 and agreement["reliable"] is True
    assert today["reliable"] is False and today["spearman_low"] < 0.3
    assert agreement["aurc"] < agreement["aurc_random"] and agreement["aurc_on_reference_cases"] < agreement[
        "aurc_reference"]
    assert set(agreement["structures"]) == {"a", "b"} and agreement["structures"]["a"]["n"] == 42
    # The case whose input does not conform is flagged by its rule, whatever its estimate.
    cases = script.load_split(split)
    fitted = script.cross_fitted(cases, "agreement", ("agreement",), 0.19)
    assert all(f["flagged"] for c, f in zip(cases, fitted) if c["rules"])
    assert [c["rules"] for c in cases[:2]] == [["input: spacing unlike training"],
                                                ["b: volume 9.0 robust SDs from the training volumes"]]
    assert 0 < agreement["flagged_share"] < 0.5


def test_two_split_seeds_pooled_as_folds_are_refused(tmp_path: Path) -> None:
    # The same cases validated under two split seeds: pooled, a fit on one would score its twin.
    both = tmp_path / "pooled"
    _fold(both / "evaluation" / "fold_0", 8, seed=1, first=0)
    _fold(both / "evaluation" / "fold_1", 8, seed=2, first=4)
    script = _load_script("quality_estimate")
    with pytest.raises(ValueError, match="saw them"):
        script.cross_fitted(script.load_split(both), "agreement", ("agreement",), 0.19)
