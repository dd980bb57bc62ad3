"""A DICOM dataset pulled from a real Orthanc over DICOMweb: the same cases as from the folder, cached after."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import HIPPOCAMPUS, dicom_dataset_maker, run_main
from tests.orthanc import OrthancServer, StudyLevelOnlyProxy

pytest_plugins = ["tests.orthanc"]  # the fixtures orthanc and orthanc_factory

CLASSES = ["Anterior", "Posterior"]


@pytest.fixture(scope="module")
def source(orthanc: OrthancServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, OrthancServer]:
    """Three real hippocampus cases as DICOM studies (two SEG, one RTSTRUCT), in a folder and in Orthanc."""
    if not (HIPPOCAMPUS / "dataset.json").is_file():
        pytest.skip(f"real hippocampus data not found at {HIPPOCAMPUS} (see ../shared/data/README.md)")
    maker = dicom_dataset_maker()
    out = tmp_path_factory.mktemp("dicom")
    entries = json.loads((HIPPOCAMPUS / "dataset.json").read_text())["training"][:3]
    for n, (e, kind) in enumerate(zip(entries, ["SEG", "RTSTRUCT", "SEG"])):
        maker.make_study(HIPPOCAMPUS / e["image"], HIPPOCAMPUS / e["label"], out, CLASSES, n, kind)
    orthanc.upload(sorted(p for p in out.rglob("*.dcm")))
    return out, orthanc


def _export(tmp_path: Path, spec: str, name: str, work: Path, env: dict | None = None):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"data:\n  dataset: {spec}\n  classes: [{', '.join(CLASSES)}]\n")
    return run_main("dataset", "export", spec, "--config", str(cfg), "--out", str(tmp_path / name),
                    "--work-dir", str(work))


def test_export_from_dicomweb_equals_the_folder_export_and_a_second_pull_retrieves_nothing(
        source, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, server = source
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    local = _export(tmp_path, str(folder), "local", tmp_path / "w1")
    assert local.returncode == 0, local.stderr
    pulled = _export(tmp_path, server.url, "pulled", tmp_path / "w2")
    assert pulled.returncode == 0, pulled.stderr
    a = json.loads((tmp_path / "local" / "manifest.json").read_text())
    b = json.loads((tmp_path / "pulled" / "manifest.json").read_text())
    assert a == b and len(b["cases"]) == 3 and {c["label_type"] for c in b["cases"]} == {"SEG", "RTSTRUCT"}
    for case in b["cases"]:
        x = nib.load(str(tmp_path / "local" / "labelsTr" / f"{case['case']}.nii.gz"))
        y = nib.load(str(tmp_path / "pulled" / "labelsTr" / f"{case['case']}.nii.gz"))
        assert np.array_equal(np.asarray(x.dataobj), np.asarray(y.dataobj)) and np.allclose(x.affine, y.affine)
    cached = list((tmp_path / "w2" / "dicom_cache" / "instances").iterdir())
    again = run_main("dataset", "check", server.url, "--config", str(tmp_path / "config.yaml"),
                     "--work-dir", str(tmp_path / "w2"))
    assert again.returncode == 0, again.stderr
    assert "3 case(s), 0 label(s) skipped, 0 not used; 0 instance(s) retrieved, 0 conversion(s)" in again.stdout
    assert sorted(cached) == sorted((tmp_path / "w2" / "dicom_cache" / "instances").iterdir())


def test_a_pacs_that_refuses_the_credentials_or_is_down_ends_with_the_pacs_exit_codes(
        source, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, server = source
    monkeypatch.setenv("DICOMWEB_USER", server.user)
    monkeypatch.setenv("DICOMWEB_PASSWORD", "wrong")
    refused = _export(tmp_path, server.url, "out", tmp_path / "w")
    assert refused.returncode == 8 and "refused the credentials" in refused.stderr
    assert "wrong" not in refused.stderr and "Traceback" not in refused.stderr
    down = _export(tmp_path, "http://127.0.0.1:9/dicom-web", "out", tmp_path / "w")
    assert down.returncode == 7 and "connection refused" in down.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("status", [400, 501])
def test_an_archive_that_answers_only_study_level_queries_is_searched_study_by_study(
        source, status: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The root's ``/series?Modality=SEG`` refused (as some archives do): every label series is still found through
    ``/studies`` and each study's ``/series``, the same export as from the folder, said once in the log."""
    import logging

    from pipeline.dicomweb import DicomWebClient

    folder, server = source
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    proxy = StudyLevelOnlyProxy(server, status)
    try:
        direct, through = DicomWebClient(server.url), DicomWebClient(proxy.url)
        with caplog.at_level(logging.WARNING, logger="pipeline.dicomweb"):
            for modality in ("SEG", "RTSTRUCT"):
                assert sorted(through.find_series(modality)) == sorted(direct.find_series(modality))
            assert len(through.find_series("SEG")) == 2 and len(through.find_series("RTSTRUCT")) == 1
        # One refusal, then straight to the studies for every later search of that client.
        assert len(proxy.refused) == 1 and "Modality=SEG" in proxy.refused[0]
        # Each search's first page (a later page is asked for until one brings nothing new).
        study_queries = [p for p in proxy.forwarded if "/studies/" in p and "/series?" in p and "offset=0" in p]
        assert len(study_queries) == 3 * 4  # three studies, four searches
        lines = [r.getMessage() for r in caplog.records if "searching its studies one by one" in r.getMessage()]
        assert lines == [f"{proxy.url} does not answer a series search at its root (HTTP {status}); searching its "
                         "studies one by one"]
        caplog.clear()

        local = _export(tmp_path, str(folder), "local", tmp_path / "w1")
        assert local.returncode == 0, local.stderr
        with caplog.at_level(logging.WARNING, logger="pipeline.dicomweb"):
            pulled = _export(tmp_path, proxy.url, "pulled", tmp_path / "w2")
        assert pulled.returncode == 0, pulled.stderr
        a = json.loads((tmp_path / "local" / "manifest.json").read_text())
        b = json.loads((tmp_path / "pulled" / "manifest.json").read_text())
        assert a == b and len(b["cases"]) == 3 and {c["label_type"] for c in b["cases"]} == {"SEG", "RTSTRUCT"}
        assert len(proxy.refused) == 2  # the export's own client, once for both modalities
        assert sum("searching its studies one by one" in r.getMessage() for r in caplog.records) == 1
    finally:
        proxy.close()


@pytest.mark.slow
def test_the_corrections_loop_through_the_pacs(source, orthanc_factory, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """run from the PACS; pacs predict stores an AUTOMATIC SEG (no retrain); a reader's newer SEG retrains."""
    from datetime import datetime

    import pydicom
    import yaml

    from tests.conftest import TINY

    folder, _ = source
    server = orthanc_factory()
    server.upload(sorted(folder.rglob("*.dcm")))
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    cfg = {**TINY, "data": {"dataset": server.url, "classes": CLASSES, "num_folds": 2},
           "train": {**TINY["train"], "epochs": 2, "iterations_per_epoch": 2, "val_every": 2}}
    config = tmp_path / "pacs.yaml"
    config.write_text(yaml.safe_dump(cfg))
    work = tmp_path / "work"

    def run() -> str:
        result = run_main("run", str(config), "--work-dir", str(work))
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "Up to date" not in run()
    manifest = json.loads((work / "dicom_dataset" / "manifest.json").read_text())
    folds = json.loads((work / "splits.json").read_text())["folds"]
    case = manifest["cases"][0]
    stored = run_main("pacs", "predict", "--url", server.url, "--study", case["study_instance_uid"], "--modality", "MR",
                      "--model", "models:/tiny-unet/1", "--work-dir", str(work))
    assert stored.returncode == 0, stored.stderr
    automatic = stored.stdout.strip().splitlines()[-1]
    assert "Up to date" in run()  # the model's own SEG is no training label: nothing changed
    # A reader corrects it (a newer MANUAL SEG of the same series) and stores it in the PACS.
    slices = sorted((pydicom.dcmread(p) for p in next(d for d in folder.iterdir() if d.is_dir() and any(
        pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID == case["series_instance_uid"]
        for f in (d / "mr").iterdir())).joinpath("mr").iterdir()), key=lambda d: int(d.InstanceNumber))
    label = np.zeros((slices[0].Columns, slices[0].Rows, len(slices)), np.uint8)
    label[5:15, 10:25, 8:20] = 1
    label[15:25, 10:25, 8:20] = 2
    maker = dicom_dataset_maker()
    corrected = maker.write_seg(label, slices, CLASSES, tmp_path / "corrected.dcm", datetime.now())
    server.upload([tmp_path / "corrected.dcm"])
    assert "Up to date" not in run()
    after = json.loads((work / "dicom_dataset" / "manifest.json").read_text())
    row = next(c for c in after["cases"] if c["series_instance_uid"] == case["series_instance_uid"])
    assert (row["label_sop_instance_uid"], row["reader_correction"]) == (corrected, True)
    text = json.dumps(after)
    assert automatic not in text and case["label_sop_instance_uid"] not in text
    assert json.loads((work / "splits.json").read_text())["folds"] == folds  # the same cases keep their folds
    # Provenance: the run's input is the label set (digest) from the URL; the version counts the correction.
    import mlflow

    from pipeline.data import label_summary

    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    version = client.get_model_version("tiny-unet", "2")
    assert "3 DICOM label objects from " + server.url in version.description
    assert "1 of them are reader corrections of automatic output" in version.description
    inputs = client.get_run(version.run_id).inputs.dataset_inputs
    assert [(d.dataset.digest, json.loads(d.dataset.source)["url"]) for d in inputs] == \
        [(label_summary(after, "")["digest"], server.url)]
    assert server.password not in version.description and "P0000" not in version.description
    assert "Up to date" in run()
