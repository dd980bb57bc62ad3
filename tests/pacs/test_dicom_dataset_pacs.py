"""A DICOM dataset pulled from a real Orthanc over DICOMweb: the same cases as from the folder, cached after."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import HIPPOCAMPUS, REPO, run_main
from tests.orthanc import OrthancServer

pytest_plugins = ["tests.orthanc"]  # the fixtures orthanc and orthanc_factory

CLASSES = ["Anterior", "Posterior"]


@pytest.fixture(scope="module")
def source(orthanc: OrthancServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, OrthancServer]:
    """Three real hippocampus cases as DICOM studies (two SEG, one RTSTRUCT), in a folder and in Orthanc."""
    if not (HIPPOCAMPUS / "dataset.json").is_file():
        pytest.skip(f"real hippocampus data not found at {HIPPOCAMPUS} (see ../shared/data/README.md)")
    spec = importlib.util.spec_from_file_location("make_dicom_dataset", REPO / "scripts" / "make_dicom_dataset.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
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
