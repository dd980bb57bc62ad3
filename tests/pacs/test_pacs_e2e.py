"""From the PACS and back, against a real Orthanc: ``pacs predict`` and ``pacs watch`` end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from pipeline.pacs import PacsClient
from tests.conftest import dicom_series, run_main, save_untrained_2mm_model
from tests.orthanc import OrthancServer

pytest_plugins = ["tests.orthanc"]
pytestmark = pytest.mark.slow
FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])
HIPPO, T1POST = "hippocrop_pgbm002", "pgbm003_t1post"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained 2 mm U-Net whose masks are non-empty on the real series (seconds per series)."""
    return save_untrained_2mm_model(tmp_path_factory.mktemp("model") / "model.pt")


def _env(server: OrthancServer, password: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMWEB_")}
    return {**env, "DICOMWEB_USER": server.user, "DICOMWEB_PASSWORD": password or server.password}


def _pacs(server: OrthancServer, *args: str, password: str | None = None, url: str | None = None
          ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "pacs", *args, "--url", url or server.url],
                          capture_output=True, text=True, timeout=600, env=_env(server, password))


def _one_error(res: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, res.stderr
    return errors[0]


def _study_of(name: str) -> str:
    return str(pydicom.dcmread(next(dicom_series(name).glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)


def _identifying_values(*folders: Path) -> set[str]:
    values: set[str] = set()
    for folder in folders:
        for path in folder.glob("*.dcm"):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"):
                value = str(ds.get(keyword, "") or "").strip()
                values.update(v for v in [value, *value.split("^")] if len(v) >= 4)
    return values


@pytest.fixture(scope="module")
def pacs(orthanc: OrthancServer) -> OrthancServer:
    """The module's Orthanc holding the real oblique series and a hippocampus crop, uploaded with STOW-RS."""
    for name in (HIPPO, T1POST):
        orthanc.upload(sorted(dicom_series(name).glob("*.dcm")))
    return orthanc


@pytest.mark.parametrize("name", [T1POST, HIPPO])
def test_pacs_predict_stores_a_seg_equal_to_predict_on_the_exported_folder(
        pacs: OrthancServer, model: Path, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import highdicom as hd

    series = dicom_series(name)
    res = _pacs(pacs, "predict", "--study", _study_of(name), "--model", str(model), "--modality", "MR",
                "--min-slices", "20", "--work-dir", str(tmp_path / "w"))
    assert res.returncode == 0, res.stderr[-3000:]
    seg_uid = res.stdout.strip().splitlines()[-1]
    # Fetch the SEG back from the PACS (WADO-RS) and read it with highdicom.
    for key, value in pacs.env().items():
        monkeypatch.setenv(key, value)
    client = PacsClient(pacs.url)
    segs = [s for s in client.seg_series_for(_study_of(name)) if s.sop_instance_uid == seg_uid]
    assert len(segs) == 1
    files = client.retrieve_series(_study_of(name), segs[0].series_uid, tmp_path / "seg")
    seg = hd.seg.segread(files[0])
    assert seg.SOPInstanceUID == seg_uid and seg.SeriesDescription == "unet-pipeline local vmodel.pt"
    sources = {}
    for path in series.glob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sources[ds.SOPInstanceUID] = ds
    first = next(iter(sources.values()))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert seg.StudyInstanceUID == first.StudyInstanceUID and seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    # The mask `predict` writes for the same series exported to a folder.
    from pipeline.cli import main

    out = tmp_path / "local"
    assert main(["predict", "--model", str(model), str(series), "--out", str(out), "--work-dir", str(tmp_path / "w"),
                 "--no-seg"]) == 0
    nifti = nib.load(out / f"{name}.nii.gz")
    mask = np.asarray(nifti.dataobj)
    to_voxel = np.linalg.inv(nifti.affine) @ FLIP
    pixels = seg.pixel_array.reshape(seg.NumberOfFrames, seg.Rows, seg.Columns)
    positions = {tuple(np.round([float(v) for v in ds.ImagePositionPatient], 4)) for ds in sources.values()}
    seen = set()
    for index, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert uid in sources
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert tuple(np.round(position, 4)) in positions
        np.testing.assert_allclose(position, [float(v) for v in sources[uid].ImagePositionPatient], atol=1e-4)
        k = int(round((to_voxel @ np.array([*position, 1.0]))[2]))
        segment = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        np.testing.assert_array_equal(pixels[index], (mask[:, :, k].T == segment).astype(np.uint8))
        seen.add((k, segment))
    assert seen == {(k, v) for k in range(mask.shape[2]) for v in (1, 2) if (mask[:, :, k] == v).any()} != set()
    # Beside the SEG, the SR of the measurements: the volumes of the same series' local CASE.json.
    from pipeline.inference import read_dicom_sr

    record = json.loads((out / f"{name}.json").read_text())
    reports = [s for s in client.list_series(_study_of(name)) if s.modality == "SR"]
    assert len(reports) == 1 and reports[0].description == f"{seg.SeriesDescription} SR"
    measured = read_dicom_sr(client.retrieve_series(_study_of(name), reports[0].uid, tmp_path / "sr")[0])
    assert measured.keys() == record["labels"].keys()
    for label, entry in record["labels"].items():
        assert measured[label]["volume_ml"] == pytest.approx(entry["volume_ml"], rel=1e-9)


def test_series_rules_choose_or_list_the_series(pacs: OrthancServer, model: Path, tmp_path: Path) -> None:
    res = _pacs(pacs, "predict", "--study", _study_of(T1POST), "--model", str(model), "--modality", "CT",
                "--work-dir", str(tmp_path / "w"))
    assert res.returncode == 2
    line = _one_error(res)
    assert "no series with modality CT" in line and "24 instances" in line


def _derived(name: str, drop: int | None = None) -> list[pydicom.Dataset]:
    """A new study (new UIDs) made of a real series; ``drop`` removes that slice (a series that cannot be read)."""
    study, series = generate_uid(), generate_uid()
    out = []
    files = sorted(dicom_series(name).glob("*.dcm"), key=lambda p: float(
        pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    for i, path in enumerate(files):
        if drop is not None and i == drop:
            continue
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out.append(ds)
    return out


def _studies(stdout: str, status: str) -> set[str]:
    return {line.split()[1].rstrip(":") for line in stdout.splitlines() if line.startswith(f"{status} ")}


def test_pacs_watch_processes_each_study_once_new_ones_later_and_reports_a_bad_one(
        orthanc_factory, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = orthanc_factory()
    good = [_derived(HIPPO) for _ in range(3)]
    for datasets in good:
        server.upload(datasets)
    work = tmp_path / "w"
    args = ("watch", "--model", str(model), "--modality", "MR", "--work-dir", str(work))
    res = _pacs(server, *args)
    assert res.returncode == 0, res.stderr[-3000:]
    studies = {d[0].StudyInstanceUID for d in good}
    processed = _studies(res.stdout, "processed")
    assert processed == studies, res.stdout
    # A second pass processes none.
    res = _pacs(server, *args)
    assert res.returncode == 0 and not [ln for ln in res.stdout.splitlines() if ln.startswith("processed ")], res.stdout
    # A study added later, and one whose series lacks a slice (it cannot be read).
    later, broken = _derived(HIPPO), _derived(HIPPO, drop=10)
    server.upload(later)
    server.upload(broken)
    res = _pacs(server, *args)
    assert res.returncode == 10, res.stdout + res.stderr
    processed = _studies(res.stdout, "processed")
    failed = [line for line in res.stdout.splitlines() if line.startswith("FAILED ")]
    assert processed == {later[0].StudyInstanceUID}
    assert len(failed) == 1 and broken[0].StudyInstanceUID in failed[0] and "missing slice" in failed[0]
    # Exactly one SEG per good study on the PACS.
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    client = PacsClient(server.url)
    for study in [*studies, later[0].StudyInstanceUID]:
        assert len(client.seg_series_for(study)) == 1, study
    assert client.seg_series_for(broken[0].StudyInstanceUID) == []
    # Nothing of the patients' images was left behind, and nothing identifying was written or printed.
    secrets = _identifying_values(dicom_series(HIPPO))
    assert secrets
    written = [p.read_bytes().decode(errors="replace") for p in work.rglob("*") if p.is_file()]
    assert not [s for s in secrets for text in [*written, res.stdout, res.stderr] if s in text]
    assert not [p for p in work.rglob("*.dcm")]


def test_wrong_password_pacs_down_and_rejected_seg_each_one_line_and_code(
        pacs: OrthancServer, orthanc_factory, model: Path, tmp_path: Path) -> None:
    study = _study_of(HIPPO)
    common = ("predict", "--study", study, "--model", str(model), "--work-dir", str(tmp_path / "w"))
    wrong = _pacs(pacs, *common, password="not-the-password")
    assert wrong.returncode == 8, wrong.stderr
    line = _one_error(wrong)
    assert pacs.url in line and "not-the-password" not in wrong.stderr + wrong.stdout

    down = _pacs(pacs, *common, url="http://127.0.0.1:9/dicom-web")
    assert down.returncode == 7
    assert "127.0.0.1:9" in _one_error(down)

    from tests.orthanc import REJECT_SEG

    read_only = orthanc_factory(lua_filter=REJECT_SEG)  # stores images, refuses every SEG
    read_only.upload(sorted(dicom_series(HIPPO).glob("*.dcm")))
    rejected = _pacs(read_only, *common)
    assert rejected.returncode == 9, rejected.stderr
    _one_error(rejected)
    secrets = _identifying_values(dicom_series(HIPPO))
    for res in (wrong, down, rejected):
        assert not [s for s in secrets if s in res.stdout + res.stderr]
    assert not list((tmp_path / "w").rglob("*.dcm"))


def test_pacs_predict_stores_an_automatic_rtstruct_on_request_that_the_project_reads_as_the_mask(
        pacs: OrthancServer, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pacs predict --rtstruct``: an RTSTRUCT beside the SEG in the study, its ROIs AUTOMATIC, read back from the
    PACS by ``dataset export`` as the mask that was predicted; nothing identifying on the console."""
    study = _study_of(HIPPO)
    res = _pacs(pacs, "predict", "--study", study, "--model", str(model), "--modality", "MR", "--rtstruct",
                "--out", str(tmp_path / "kept"), "--work-dir", str(tmp_path / "w"))
    assert res.returncode == 0, res.stderr[-3000:]
    rt_uid = next(line.split()[1] for line in res.stderr.splitlines() if line.startswith("RTSTRUCT "))
    assert not [s for s in _identifying_values(dicom_series(HIPPO)) if s in res.stdout + res.stderr]
    for key, value in pacs.env().items():
        monkeypatch.setenv(key, value)
    client = PacsClient(pacs.url)
    stored = [s for s in client.list_series(study) if s.modality == "RTSTRUCT"]
    assert len(stored) == 1 and stored[0].description == "unet-pipeline local vmodel.pt"
    source = tmp_path / "source"
    shutil.copytree(dicom_series(HIPPO), source / "image")
    rt_file = client.retrieve_series(study, stored[0].uid, source / "rtstruct")[0]
    rt = pydicom.dcmread(rt_file)
    assert rt.SOPInstanceUID == rt_uid and {r.ROIGenerationAlgorithm for r in rt.StructureSetROISequence} == {
        "AUTOMATIC"}
    kept = nib.load(str(next((tmp_path / "kept").glob("*.nii.gz"))))
    classes = [r.ROIName for r in rt.StructureSetROISequence]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  dataset: {source}\n  classes: [{', '.join(classes)}]\n")
    refused = run_main("dataset", "check", str(source), "--config", str(cfg), "--work-dir", str(tmp_path / "w"))
    assert refused.returncode == 2 and "1 label(s) set aside as AUTOMATIC" in refused.stdout
    export = run_main("dataset", "export", str(source), "--config", str(cfg), "--set", "data.allow_automatic_labels=true",
                      "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "w"))
    assert export.returncode == 0, export.stderr
    exported = nib.load(str(next((tmp_path / "out" / "labelsTr").glob("*.nii.gz"))))
    from pipeline.data.dicom_labels import place_on_grid

    got = np.asarray(exported.dataobj)
    truth = place_on_grid(np.asarray(kept.dataobj).astype(np.uint8), kept.affine, exported.affine, got.shape, "mask")
    assert truth.any()
    for value in range(1, len(classes) + 1):
        a, b = truth == value, got == value
        if a.any():
            assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.95, classes[value - 1]
