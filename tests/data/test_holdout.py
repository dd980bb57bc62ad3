"""The held-out test split: ``data.holdout`` keeps its cases out of everything a run reads, ``evaluate --cases``
scores only them, and the lists fixed in ``configs/holdout/`` are what the script makes, outside the development
folds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.data import kfold_splits, load_dataset, select_cases
from pipeline.errors import InputDataError
from pipeline.registry.privacy import holdout_label, run_params
from tests.conftest import REPO, SHARED_DATA, TINY, copy_hippocampus_subset
from tests.test_scripts import _load_script

TASKS = ("hippocampus", "hn_ct", "left_atrium")


def test_select_cases_keeps_or_drops_the_listed_cases_of_real_data(hippocampus: Path, tmp_path: Path) -> None:
    dataset = load_dataset(copy_hippocampus_subset(tmp_path / "ds", 5))
    ids = [c.case_id for c in dataset.cases]
    listed = tmp_path / "test.txt"
    listed.write_text(f"# two of them\n{ids[3]}\n\n{ids[1]}  # trailing comment\n")
    assert [c.case_id for c in select_cases(dataset, listed, keep=True).cases] == [ids[1], ids[3]]
    assert [c.case_id for c in select_cases(dataset, listed, keep=False).cases] == [ids[0], ids[2], ids[4]]
    # A list made for another dataset is an error naming the file and the case, not a silent no-op.
    listed.write_text(f"{ids[0]}\nla_010\n")
    with pytest.raises(InputDataError) as err:
        select_cases(dataset, listed, keep=False)
    assert str(listed) in str(err.value) and "la_010" in str(err.value)
    listed.write_text("# nothing\n")
    with pytest.raises(InputDataError, match="names no case"):
        select_cases(dataset, listed, keep=True)


@pytest.mark.parametrize("task", TASKS)
def test_the_fixed_lists_are_the_script_s_and_avoid_the_development_folds(task: str, tmp_path: Path) -> None:
    data = SHARED_DATA / task
    if not (data / "dataset.json").is_file():
        pytest.skip(f"real {task} data not found at {data} (see ../shared/data/README.md)")
    fixed = REPO / "configs" / "holdout" / f"{task}.txt"
    made = tmp_path / f"{task}.txt"
    assert _load_script("make_holdout").main([str(data), "--out", str(made)]) == 0
    assert made.read_text() == fixed.read_text()
    ids = [c.case_id for c in load_dataset(data).cases]
    held = {c.case_id for c in select_cases(load_dataset(data), fixed, keep=True).cases}
    assert len(held) == round(0.2 * len(ids))
    development = {c for fold in kfold_splits(ids, 5, 0)[:2] for c in fold["val"]}
    assert not held & development


def test_a_run_never_reads_the_held_out_cases_and_logs_no_path(tmp_path: Path) -> None:
    from pipeline.stages import prepare

    cfg_file = tmp_path / "tiny.yaml"
    listed = tmp_path / "lists" / "held.txt"
    listed.parent.mkdir()
    cfg_file.write_text(yaml.safe_dump({**TINY, "data": {**TINY["data"], "holdout": "lists/held.txt"}}))
    work = tmp_path / "work"
    # The demo data's ids exist only once generated: generate, then list two of them.
    unheld = load_config(cfg_file)
    unheld.data.holdout = None
    everything = [c.case_id for c in prepare(unheld, work).dataset.cases]
    listed.write_text("\n".join(everything[:2]) + "\n")
    (work / "splits.json").unlink()

    cfg = load_config(cfg_file)
    assert cfg.data.holdout == str(listed.resolve())  # relative to the config file
    prepared = prepare(cfg, work)
    seen = {c.case_id for c in prepared.dataset.cases} | set(prepared.split["train"]) | set(prepared.split["val"])
    assert seen == set(everything[2:])
    stored = json.loads((work / "splits.json").read_text())
    assert set(stored["key"]["cases"]) == set(everything[2:])
    assert not set(everything[:2]) & {c for fold in stored["folds"] for c in fold["train"] + fold["val"]}
    # MLflow sees the list by count and content hash, never its path.
    params = run_params(cfg.flat(), "demo", "0" * 64, False, {}, {}, 1)
    assert params["data.holdout"] == holdout_label(str(listed)) and str(tmp_path) not in params["data.holdout"]
    assert params["data.holdout"].startswith("2 held-out cases (sha256 ")
