"""``unet-pipeline worklist`` on ``predict`` output folders: real hippocampus cases and a real DICOM series predicted by
a small calibrated model; the list is the records in the report's order, as JSON, as CSV, per structure."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from pipeline.quality.records import review_order
from pipeline.quality.worklist import WorkItem, rank
from tests.conftest import HIPPOCAMPUS, dicom_series, run_main
from tests.quality.calibrated_model import STRUCTURES, save_calibrated_model

SERIES = "hippocrop_pgbm002"
VIEWER = "https://ohif.example.org/"


@pytest.fixture(scope="module")
def predicted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One folder of ``predict`` outputs: one hippocampus case by ``old.pt`` first, then three more and the DICOM
    crop by ``model.pt`` (the same model, a later version by the time it predicted)."""
    if not (HIPPOCAMPUS / "dataset.json").is_file():
        pytest.skip(f"real hippocampus data not found at {HIPPOCAMPUS} (see ../shared/data/README.md)")
    series = dicom_series(SERIES)
    root = tmp_path_factory.mktemp("worklist")
    scans = sorted((HIPPOCAMPUS / "imagesTr").glob("*.nii.gz"))[:4]
    old_in, new_in = root / "in_old", root / "in"
    old_in.mkdir()
    new_in.mkdir()
    shutil.copy(scans[0], old_in / scans[0].name)
    for scan in scans[1:]:
        shutil.copy(scan, new_in / scan.name)
    shutil.copytree(series, new_in / "dicom_crop")
    out = root / "out"
    for model, inputs in ((save_calibrated_model(root / "old.pt"), old_in),
                          (save_calibrated_model(root / "model.pt"), new_in)):
        done = run_main("predict", "--model", str(model), str(inputs), "--out", str(out), "--work-dir",
                        str(root / "w"))
        assert done.returncode == 0, done.stderr[-3000:]
    records = {}
    for path in out.glob("*.json"):
        record = json.loads(path.read_text())
        records[record["case"]] = record
    first = pydicom.dcmread(next(series.glob("*.dcm")), stop_before_pixels=True)
    return {"out": out, "records": records, "old_case": scans[0].name.removesuffix(".nii.gz"), "root": root,
            "study": str(first.StudyInstanceUID), "series": str(first.SeriesInstanceUID)}


def _json(*args: str) -> list[dict]:
    done = run_main("worklist", *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["items"]


def test_the_list_is_the_records_in_the_reports_order_with_their_reasons_uids_and_versions(predicted: dict) -> None:
    records = predicted["records"]
    items = _json(str(predicted["out"]))
    assert len(records) == 5 and {r["model"]["version"] for r in records.values()} == {"old.pt", "model.pt"}
    # Estimates differ between cases, so the order says something.
    assert len({r["estimated_mean_dice"] for r in records.values()}) == 5
    assert [i["case"] for i in items] == [r["case"] for r in sorted(records.values(), key=review_order)]
    for item in items:
        record = records[item["case"]]
        assert item["estimated_dice"] == pytest.approx(record["estimated_mean_dice"])
        assert item["flagged"] is record["flagged"] and item["model"] == record["model"]
        assert item["reasons"][:len(record["reasons"])] == record["reasons"]
        older = item["reasons"][len(record["reasons"]):]
        if item["case"] == predicted["old_case"]:
            assert older == ["predicted by version old.pt of local; version model.pt is the newest in these sources"]
        else:
            assert older == []
        assert item["volumes_ml"] == {n: pytest.approx(e["volume_ml"]) for n, e in record["labels"].items()}
        dicom = item["case"] == "dicom_crop"
        assert (item["study_instance_uid"], item["series_instance_uid"]) == (
            (predicted["study"], predicted["series"]) if dicom else (None, None))
        assert item["viewer_url"] is None


def test_csv_per_structure_with_viewer_links_and_a_limit(predicted: dict, tmp_path: Path) -> None:
    out = tmp_path / "lists" / "worklist.csv"
    out.parent.mkdir()
    done = run_main("worklist", str(predicted["out"]), "--structure", STRUCTURES[1], "--out", str(out),
                    "--viewer-url", VIEWER)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{out}: 5 series, most urgent first"
    assert [p.name for p in out.parent.iterdir()] == ["worklist.csv"]  # written atomically: no temporary left
    rows = list(csv.DictReader(out.open()))
    records = predicted["records"]

    def key(record: dict) -> tuple:
        return review_order({**record, "estimated_mean_dice": record["labels"][STRUCTURES[1]]["estimated_dice"]})

    assert [r["case"] for r in rows] == [r["case"] for r in sorted(records.values(), key=key)]
    for row in rows:
        labels = records[row["case"]]["labels"]
        assert row["structure"] == STRUCTURES[1]
        assert float(row["estimated_dice"]) == pytest.approx(labels[STRUCTURES[1]]["estimated_dice"], rel=1e-5)
        for name in STRUCTURES:
            assert float(row[f"{name} volume_ml"]) == pytest.approx(labels[name]["volume_ml"], rel=1e-5)
        assert row["viewer_url"] == (f"https://ohif.example.org/viewer?StudyInstanceUIDs={predicted['study']}"
                                     if row["case"] == "dicom_crop" else "")
    # --limit keeps the head of the same list.
    limited = _json(str(predicted["out"]), "--structure", STRUCTURES[1], "--limit", "2")
    assert [i["case"] for i in limited] == [r["case"] for r in rows[:2]]
    # Nothing identifying of the DICOM case, and no path, in what goes out.
    series = pydicom.dcmread(next(dicom_series(SERIES).glob("*.dcm")), stop_before_pixels=True)
    secrets = {str(series.get(k, "") or "") for k in ("PatientName", "PatientID", "PatientBirthDate")} - {""}
    text = out.read_text() + json.dumps(limited)
    assert secrets and not [s for s in secrets if s in text] and str(predicted["root"]) not in text


def test_help_runs_and_bad_input_is_one_line_with_the_pacs_exit_codes(predicted: dict, tmp_path: Path) -> None:
    helped = subprocess.run([sys.executable, "-m", "pipeline", "worklist", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert helped.returncode == 0 and "--structure" in helped.stdout and "SOURCE" in helped.stdout
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("")
    cases = [((str(tmp_path / "missing"),), 2, "is not a folder"),
             ((str(tmp_path / "empty"),), 2, "is not a predict output folder"),
             (("http://127.0.0.1:9/dicom-web",), 7, "connection refused"),
             ((str(predicted["out"]), "--structure", "Hippocampus"), 2, "not a structure of these predictions"),
             ((str(predicted["out"]), "--model", "other"), 2, "no prediction of model 'other'"),
             ((str(predicted["out"]), "--limit", "0"), 2, "--limit must be at least 1"),
             ((str(predicted["out"]), "--out", str(tmp_path / "a_file" / "x.csv")), 2, "cannot be written")]
    for args, code, text in cases:
        done = run_main("worklist", *args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == code and len(lines) == 1 and text in lines[0], (args, done.stderr)
        assert lines[0].startswith("error: ") and done.stdout == ""


def test_the_table_has_one_line_per_series_and_says_how_many_on_stderr(predicted: dict) -> None:
    done = run_main("worklist", str(predicted["out"]), "--limit", "3")
    assert done.returncode == 0, done.stderr
    items = _json(str(predicted["out"]), "--limit", "3")
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and done.stderr.strip().splitlines()[-1] == "3 of 5 series to review, most urgent first"
    for n, (line, item) in enumerate(zip(lines, items), start=1):
        assert line.split()[:3] == [str(n), f"{item['estimated_dice']:.3f}", *(["flagged"] if item["flagged"] else [
            item["case"]])]
        assert item["case"] in line and f"local v{item['model']['version']}" in line


def _item(case: str, model: str, version: str, dice: float | None, when: float) -> WorkItem:
    return WorkItem(case, None, None, model, version, False, (), {"a": dice}, {"a": 1.0}, when)


def test_several_models_need_a_choice_and_registry_versions_compare_as_numbers() -> None:
    from pipeline.errors import ConfigError

    items = [_item("x", "hippo", "10", 0.7, 1.0), _item("y", "hippo", "9", 0.6, 2.0), _item("z", "other", "1", 0.1, 0)]
    with pytest.raises(ConfigError, match="2 models"):
        rank(items)
    listed = rank(items, model="hippo")
    assert [i.case for i in listed.items] == ["y", "x"]
    assert listed.items[0].reasons == ("predicted by version 9 of hippo; version 10 is the newest in these sources",)
    assert listed.items[1].reasons == ()
