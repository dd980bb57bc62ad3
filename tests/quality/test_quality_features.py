"""``scripts/quality_features.py``: candidate feature sets compared out of sample on the case records an evaluation
keeps (``quality_records.json``, written as evaluation writes it)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.evaluation.quality_review import RECORDS_FILE, write_quality_records
from pipeline.quality import Conformity, add_true_dice, case_record, fit_calibration
from tests.test_scripts import _load_script


def _evaluation(folder: Path, n: int, seed: int, drop: tuple[str, ...] = (), volume_z: bool = True) -> Path:
    """An evaluation folder of ``n`` cases whose true Dice follows ``fragments``; the other signals are noise.

    Signals named in ``drop`` are left out of the records (a run that predates them); without ``volume_z``
    it is unknown (NaN, stored as null) as for a model without training volumes.
    """
    rs = np.random.RandomState(seed)
    labels = np.zeros((6, 6, 6), dtype=np.uint8)
    labels[1:4, 1:4, 1:4] = 1
    records = []
    for i in range(n):
        frag = float(rs.uniform(0.0, 0.4))
        signals = {"spread": 0.1, "boundary_entropy": 0.2, "soft_dice": float(rs.uniform(0.8, 0.9)),
                   "expected_error": float(rs.uniform(0.1, 0.3)), "voxels": float(rs.uniform(900, 1100)),
                   "fragments": frag, "volume_z": float(rs.uniform(0, 2)) if volume_z else math.nan}
        signals = {k: v for k, v in signals.items() if k not in drop}
        record = case_record(f"case{i:02d}", labels, np.eye(4), {1: "a"}, {1: signals}, None, Conformity(True), {}, {},
                             {"mask": None})
        records.append(add_true_dice(record, {"a": 0.95 - frag + float(rs.normal(0, 0.01))}))
    folder.mkdir(parents=True)
    return write_quality_records(records, folder)


def test_the_records_file_holds_the_signals_and_true_dice_as_calibration_takes_them(tmp_path: Path) -> None:
    path = _evaluation(tmp_path / "evaluation" / "fold_0", 12, 0)
    stored = json.loads(path.read_text())
    assert "fragments" in stored["signals"] and "volume_z" in stored["signals"]
    script = _load_script("quality_features")
    signals, truth = script.load_cases(path)
    assert len(signals) == 12 and set(signals[0][1]) >= {"soft_dice", "fragments", "volume_z"}
    assert 0.5 < truth[0][1] < 1.0
    # The script's figures are the calibration's own, for the set it was asked for.
    row = script.compare(signals, truth, {"+fragments": ("soft_dice", "expected_error", "voxels", "fragments")}, 0.19)[0]
    v = fit_calibration(signals, truth, features=("soft_dice", "expected_error", "voxels", "fragments")).validation
    assert row["spearman_oos"] == pytest.approx(v["spearman_oos"]) and row["flagged_share"] == v["flagged_share"]


def test_the_script_prints_each_folder_and_feature_set_and_says_what_a_run_lacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    new = _evaluation(tmp_path / "new" / "evaluation" / "fold_0", 24, 1).parent
    old = _evaluation(tmp_path / "old" / "evaluation" / "fold_0", 24, 2, drop=("fragments", "volume_z")).parent
    unknown = _evaluation(tmp_path / "novolumes" / "evaluation" / "fold_0", 24, 3, volume_z=False).parent
    bare = tmp_path / "bare" / "evaluation"
    bare.mkdir(parents=True)
    (bare / "quality.csv").write_text("case\n")
    script = _load_script("quality_features")
    assert script.main([str(new), str(tmp_path / "old"), str(unknown), str(bare)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == list(script.COLUMNS)
    rows = {(line.split()[0], line.split()[1]): line.split()[2:] for line in lines[1:13]}
    assert len(rows) == 12  # 3 folders x 4 sets
    # Where the Dice follows the fragments, the sets with them rank the cases far better out of sample.
    current, with_fragments = float(rows[str(new), "current"][1]), float(rows[str(new), "+fragments"][1])
    assert with_fragments > 0.8 and with_fragments > current + 0.3
    assert rows[str(new), "+both"][-1] in ("yes", "no")
    assert " ".join(rows[str(old), "+fragments"][1:]).startswith("lacks fragments")
    assert " ".join(rows[str(old), "+both"][1:]).startswith("lacks fragments, volume_z")
    assert math.isfinite(float(rows[str(old), "current"][1]))  # the current set still fits on the old run
    assert "volume_z unknown for every case" in " ".join(rows[str(unknown), "+volume_z"])
    assert float(rows[str(unknown), "+fragments"][1]) > 0.8
    assert f"{bare}: no {RECORDS_FILE}" in out


def test_an_evaluation_keeps_its_case_records_with_signals_and_true_dice(tmp_path: Path) -> None:
    """A real evaluation (untrained tiny model, 2 synthetic cases) writes the file the script reads."""
    import torch

    from pipeline.data import load_dataset, make_demo_dataset
    from pipeline.evaluation import evaluate_cases
    from pipeline.inference import Predictor, load_model
    from pipeline.quality import SIGNALS
    from tests.conftest import save_untrained_2mm_model

    dataset = load_dataset(make_demo_dataset(tmp_path / "data", 2, [28, 28, 28]))
    model = load_model(save_untrained_2mm_model(tmp_path / "m.pt"), torch.device("cpu"))
    out = tmp_path / "evaluation"
    evaluate_cases(Predictor([model], torch.device("cpu")), dataset.cases, out, save_predictions=False, report=False)
    stored = json.loads((out / RECORDS_FILE).read_text())
    assert stored["signals"] == list(SIGNALS) and len(stored["records"]) == 2
    signals, truth = _load_script("quality_features").load_cases(out / RECORDS_FILE)
    assert [sorted(case) for case in signals] == [[1, 2], [1, 2]] and [sorted(case) for case in truth] == [[1, 2], [1, 2]]
    assert all(set(s) == set(SIGNALS) for case in signals for s in case.values())
    assert all(0.0 <= d <= 1.0 for case in truth for d in case.values())
