"""The corrections loop with its worklist, against a real Orthanc: ``pacs predict`` stores SEG + SR for three
studies; ``worklist`` lists them worst first by the estimates their SRs carry; a reader's MANUAL SEG of the first
takes it off the list; the next ``run`` trains with that SEG."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml

from pipeline.inference import ReviewFlag, read_dicom_sr, read_prediction_report
from pipeline.pacs import PacsClient
from tests.conftest import HIPPOCAMPUS, TINY, dicom_dataset_maker, run_main
from tests.orthanc import OrthancServer
from tests.quality.calibrated_model import save_calibrated_model

pytest_plugins = ["tests.orthanc"]
pytestmark = pytest.mark.slow
CLASSES = ["Anterior", "Posterior"]
VIEWER = "https://ohif.example.org"


def _maker():
    return dicom_dataset_maker()


def _slices(folder: Path) -> list[pydicom.Dataset]:
    return sorted((pydicom.dcmread(p) for p in (folder / "mr").iterdir()), key=lambda d: int(d.InstanceNumber))


def _sr_means(client: PacsClient, studies: list[str], tmp: Path) -> tuple[dict[str, float], dict[str, ReviewFlag]]:
    """Each study's SR read back from the PACS: the mean of the estimated Dice it states, and its review flag."""
    means, reviews = {}, {}
    for study in studies:
        reports = [s for s in client.list_series(study) if s.modality == "SR"]
        assert len(reports) == 1, study
        path = client.retrieve_series(study, reports[0].uid, tmp / study)[0]
        measured = read_dicom_sr(path)
        estimates = [m["estimated_dice"] for m in measured.values()]
        assert all(isinstance(e, float) for e in estimates), measured
        means[study] = float(np.mean(estimates))
        review = read_prediction_report(path).review
        assert review is not None, study
        reviews[study] = review
    return means, reviews


def _worklist(server: OrthancServer, *args: str) -> list[dict]:
    done = run_main("worklist", server.url, "--json", "--viewer-url", VIEWER, *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["items"]


def test_the_worklist_ranks_the_pacs_predictions_and_a_readers_correction_takes_one_off_and_trains(
        orthanc_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not (HIPPOCAMPUS / "dataset.json").is_file():
        pytest.skip(f"real hippocampus data not found at {HIPPOCAMPUS} (see ../shared/data/README.md)")
    maker = _maker()
    dicom = tmp_path / "dicom"
    entries = json.loads((HIPPOCAMPUS / "dataset.json").read_text())["training"][:3]
    made = [maker.make_study(HIPPOCAMPUS / e["image"], HIPPOCAMPUS / e["label"], dicom, CLASSES, n, "SEG")
            for n, e in enumerate(entries)]
    folders = [dicom / f"study_{n:04d}" for n in range(len(made))]
    studies = [str(pydicom.dcmread(next((f / "mr").iterdir()), stop_before_pixels=True).StudyInstanceUID)
               for f in folders]
    server = orthanc_factory()
    server.upload(sorted(dicom.rglob("*.dcm")))
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    work = tmp_path / "work"
    # The third study by an older version of the model, before the other two by the newer one.
    old, new = save_calibrated_model(tmp_path / "old.pt"), save_calibrated_model(tmp_path / "model.pt")
    for model, study in ((old, studies[2]), (new, studies[0]), (new, studies[1])):
        stored = run_main("pacs", "predict", "--url", server.url, "--study", study, "--modality", "MR",
                          "--model", str(model), "--work-dir", str(work))
        assert stored.returncode == 0, stored.stderr[-3000:]

    items = _worklist(server)
    means, reviews = _sr_means(PacsClient(server.url), studies, tmp_path / "sr")
    assert len(set(means.values())) == 3  # distinct estimates: the order is the SRs' to decide
    assert [i["study_instance_uid"] for i in items] == sorted(studies, key=lambda s: means[s])
    series_of = {s: m["series_uid"] for s, m in zip(studies, made)}
    for item in items:
        study = item["study_instance_uid"]
        assert item["series_instance_uid"] == item["case"] == series_of[study]
        assert item["estimated_dice"] == pytest.approx(means[study])
        assert item["viewer_url"] == f"{VIEWER}/viewer?StudyInstanceUIDs={study}"
        # the case record's flag and reasons, as the SR states them
        assert set(item["volumes_ml"]) == set(CLASSES) and item["flagged"] is reviews[study].flagged
        if study == studies[2]:
            assert item["model"] == {"name": "local", "version": "old.pt"}
            assert item["reasons"] == [*reviews[study].reasons, "predicted by version old.pt of local; version "
                                       "model.pt is the newest in these sources"]
        else:
            assert item["model"] == {"name": "local", "version": "model.pt"}
            assert item["reasons"] == list(reviews[study].reasons)

    # Only UIDs identify a series in what goes out: no patient's name or ID (the studies' are P0000...).
    assert not [f"P{n:04d}" for n in range(len(made)) if f"P{n:04d}" in json.dumps(items)]
    # The credentials of pacs: refused ones end in one line and exit 8, the password never shown.
    monkeypatch.setenv("DICOMWEB_PASSWORD", "not-the-password")
    refused = run_main("worklist", server.url)
    assert refused.returncode == 8 and refused.stdout == "", refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "refused the credentials" in refused.stderr
    assert "not-the-password" not in refused.stderr
    monkeypatch.setenv("DICOMWEB_PASSWORD", server.password)

    def label_of(item: dict) -> tuple[np.ndarray, list[pydicom.Dataset]]:
        slices = _slices(folders[studies.index(item["study_instance_uid"])])
        label = np.zeros((slices[0].Columns, slices[0].Rows, len(slices)), np.uint8)
        label[5:15, 10:25, 8:20] = 1
        label[15:25, 10:25, 8:20] = 2
        return label, slices

    # A reader corrects the most urgent one: a MANUAL SEG of its series, newer than the prediction.
    first = items[0]
    corrected = maker.write_seg(*label_of(first), CLASSES, tmp_path / "corrected.dcm", datetime.now())
    server.upload([tmp_path / "corrected.dcm"])
    after = _worklist(server)
    assert [i["series_instance_uid"] for i in after] == [i["series_instance_uid"] for i in items[1:]]

    # Another reader's edit of the second, saved by a viewer as AUTOMATIC: still listed, until a
    # data.reader_edit_rules rule (the one training applies) recognises it.
    cfg = {**TINY, "data": {"dataset": server.url, "classes": CLASSES, "num_folds": 2},
           "train": {**TINY["train"], "epochs": 1, "iterations_per_epoch": 1, "val_every": 1}}
    with_rules = tmp_path / "rules.yaml"
    with_rules.write_text(yaml.safe_dump({**cfg, "data": {**cfg["data"], "reader_edit_rules": [
        {"SeriesDescription": "^edited in the viewer$"}]}}))
    maker.write_seg(*label_of(items[1]), CLASSES, tmp_path / "edit.dcm", datetime.now(), automatic=True,
                    description="edited in the viewer")
    server.upload([tmp_path / "edit.dcm"])
    assert [i["series_instance_uid"] for i in _worklist(server)] == [i["series_instance_uid"] for i in items[1:]]
    assert [i["series_instance_uid"] for i in _worklist(server, "--config", str(with_rules))] == [
        items[2]["series_instance_uid"]]

    # The next run trains with the reader's SEG (a tiny training: the loop, not the model, is under test).
    config = tmp_path / "pacs.yaml"
    config.write_text(yaml.safe_dump(cfg))
    trained = run_main("run", str(config), "--work-dir", str(work))
    assert trained.returncode == 0, trained.stderr[-3000:]
    manifest = json.loads((work / "dicom_dataset" / "manifest.json").read_text())
    row = next(c for c in manifest["cases"] if c["series_instance_uid"] == first["series_instance_uid"])
    assert (row["label_sop_instance_uid"], row["reader_correction"]) == (corrected, True)
    assert len(manifest["cases"]) == 3
