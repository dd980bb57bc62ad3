"""``predict`` as a colleague runs it: DICOM SEG, outputs, batches, re-runs, torchrun shards, settings."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from pipeline.cli import main
from tests.conftest import HIPPOCAMPUS, dicom_series, save_untrained_2mm_model

FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS, written out independently of the package


def _hippo_images(n: int) -> list[Path]:
    files = sorted((HIPPOCAMPUS / "imagesTr").glob("*.nii.gz"))[:n]
    if len(files) < n:
        pytest.skip(f"real hippocampus data not found at {HIPPOCAMPUS} (see ../shared/data/README.md)")
    return files


def _predict(*args: str) -> int:
    return main(["predict", *args])


# ---------------------------------------------------------------- DICOM SEG on an oblique series


@pytest.fixture(scope="module")
def oblique_prediction(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``predict`` on the real oblique 512 x 512 x 24 series with an untrained 2 mm model (non-empty masks)."""
    series = dicom_series("pgbm003_t1post")
    tmp = tmp_path_factory.mktemp("oblique")
    ckpt = save_untrained_2mm_model(tmp / "model.pt")
    out = tmp / "out"
    assert _predict("--model", str(ckpt), str(series), "--out", str(out), "--work-dir", str(tmp / "w")) == 0
    return {"series": series, "out": out, "ckpt": ckpt, "tmp": tmp}


def test_dicom_seg_frames_reference_the_source_slices_and_equal_the_nifti(oblique_prediction: dict) -> None:
    import highdicom as hd

    series, out = oblique_prediction["series"], oblique_prediction["out"]
    assert sorted(p.name for p in out.iterdir()) == [".thumbnails", *sorted(
        f"pgbm003_t1post{s}" for s in (".nii.gz", ".seg.dcm", ".sr.dcm", ".json")), "report.html", "summary.csv"]
    seg = hd.seg.segread(out / "pgbm003_t1post.seg.dcm")
    sources = {}
    for path in series.iterdir():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sources[ds.SOPInstanceUID] = ds
    any_source = next(iter(sources.values()))
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == any_source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == any_source.FrameOfReferenceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["enhancing", "oedema"]
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "local" and algorithm.AlgorithmVersion == "model.pt"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == any_source.SeriesInstanceUID
    iop = [float(v) for v in seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient]

    nifti = nib.load(out / "pgbm003_t1post.nii.gz")
    mask = np.asarray(nifti.dataobj)
    to_voxel = np.linalg.inv(nifti.affine) @ FLIP  # LPS mm -> voxel index
    frames = seg.PerFrameFunctionalGroupsSequence
    assert len(frames) == seg.NumberOfFrames > 0
    pixels = seg.pixel_array.reshape(len(frames), seg.Rows, seg.Columns)
    checked = set()
    for index, frame in enumerate(frames):
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert uid in sources, "frame references an instance outside the series"
        source = sources[uid]
        assert np.allclose(iop, [float(v) for v in source.ImageOrientationPatient], atol=0)
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [float(v) for v in source.ImagePositionPatient], atol=1e-4)
        voxel = to_voxel @ np.array([*position, 1.0])
        # The slice's first pixel is voxel (0, 0, k); NIfTI stores its affine in float32, hence the tolerance.
        np.testing.assert_allclose(voxel[:2], [0, 0], atol=5e-3)
        k = int(round(voxel[2]))
        assert abs(voxel[2] - k) < 5e-3
        segment = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        expected = (mask[:, :, k].T == segment).astype(np.uint8)  # (i, j) = (column, row) -> (row, column)
        np.testing.assert_array_equal(pixels[index], expected)
        checked.add((k, segment))
    # Every non-empty slice of every label is in the SEG (empty frames omitted).
    present = {(k, v) for k in range(mask.shape[2]) for v in (1, 2) if (mask[:, :, k] == v).any()}
    assert checked == present and {v for _, v in present} == {1, 2}


def test_outputs_have_ordinary_permissions(oblique_prediction: dict) -> None:
    umask = os.umask(0)
    os.umask(umask)
    files = [p for p in oblique_prediction["out"].rglob("*") if p.is_file()]
    assert len(files) == 7  # mask, SEG, SR, record, thumbnail, summary, report
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_rerun_skips_complete_cases_and_redoes_incomplete_ones(oblique_prediction: dict, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    shutil.copytree(oblique_prediction["out"], out)
    args = ["--model", str(oblique_prediction["ckpt"]), str(oblique_prediction["series"]), "--out", str(out),
            "--work-dir", str(tmp_path / "w")]
    nifti, seg = out / "pgbm003_t1post.nii.gz", out / "pgbm003_t1post.seg.dcm"
    before = {p: p.stat().st_mtime_ns for p in (nifti, seg)}
    capsys.readouterr()
    assert _predict(*args) == 0
    assert "1 case(s) already complete" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in (nifti, seg)} == before
    seg.unlink()  # an interrupted case: its NIfTI alone does not make it complete
    assert _predict(*args) == 0
    assert seg.is_file() and nifti.stat().st_mtime_ns != before[nifti]
    mtime = nifti.stat().st_mtime_ns
    assert _predict(*args, "--overwrite") == 0
    assert nifti.stat().st_mtime_ns != mtime
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


# ---------------------------------------------------------------- batches, probabilities, shards


def test_folder_of_inputs_and_probabilities(tmp_path: Path, checkpoint_2mm: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for image in _hippo_images(2):
        shutil.copy(image, inputs / image.name)
    shutil.copytree(dicom_series("hippocrop_pgbm002"), inputs / "crop_a")
    (inputs / "notes.txt").write_text("not an image\n")
    out = tmp_path / "out"
    assert _predict("--model", str(checkpoint_2mm), str(inputs), "--out", str(out), "--work-dir", str(tmp_path / "w"),
                    "--save-probabilities", "--no-postprocess") == 0
    names = sorted(p.name for p in out.iterdir())
    cases = [p.name.removesuffix(".nii.gz") for p in sorted(inputs.glob("*.nii.gz"))] + ["crop_a"]
    assert names == sorted([f"{c}.nii.gz" for c in cases] + [f"{c}_probabilities.nii.gz" for c in cases]
                           + [f"{c}.json" for c in cases] + ["crop_a.seg.dcm", "crop_a.sr.dcm", ".thumbnails",
                                                            "report.html", "summary.csv"])
    for case in cases:
        labels = np.asarray(nib.load(out / f"{case}.nii.gz").dataobj)
        probs = nib.load(out / f"{case}_probabilities.nii.gz")
        assert probs.shape == (*labels.shape, 3) and probs.get_data_dtype() == np.float32
        p = np.asarray(probs.dataobj)
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-4)
        np.testing.assert_array_equal(np.argmax(p, -1), labels)
        np.testing.assert_allclose(probs.affine, nib.load(out / f"{case}.nii.gz").affine)


def test_duplicate_case_names_are_refused_before_anything_is_written(tmp_path: Path, checkpoint_2mm: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    image = _hippo_images(1)[0]
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        shutil.copy(image, tmp_path / sub / image.name)
    out = tmp_path / "out"
    code = _predict("--model", str(checkpoint_2mm), str(tmp_path / "a" / image.name), str(tmp_path / "b" / image.name),
                    "--out", str(out), "--work-dir", str(tmp_path / "w"))
    assert code == 2 and "outputs would collide" in capsys.readouterr().err
    assert not out.exists()


def test_one_bad_case_in_a_batch_is_reported_and_the_others_are_written(tmp_path: Path, checkpoint_2mm: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    good = _hippo_images(1)[0]
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(good.read_bytes()[:2000])
    out = tmp_path / "out"
    code = _predict("--model", str(checkpoint_2mm), str(good), str(bad), "--out", str(out), "--work-dir",
                    str(tmp_path / "w"))
    err = capsys.readouterr().err
    assert code == 10, err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [line for line in err.splitlines()
                                                                               if str(bad) in line]
    # No summary: the batch is not complete while one case has no record.
    assert sorted(p.name for p in out.iterdir()) == [".thumbnails", good.name.replace(".nii.gz", ".json"), good.name]


@pytest.mark.slow
def test_torchrun_shards_cases_without_duplicates_or_gaps(tmp_path: Path, checkpoint_2mm: Path) -> None:
    images = _hippo_images(5)
    out = tmp_path / "out"
    torchrun = Path(sys.executable).with_name("torchrun")
    res = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "pipeline", "predict", "--model",
         str(checkpoint_2mm), *map(str, images), "--out", str(out), "--work-dir", str(tmp_path / "w")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    printed = [Path(line.strip()).name for line in res.stdout.splitlines() if line.strip().endswith(".nii.gz")]
    assert sorted(printed) == sorted(p.name for p in images)  # each case written once, by one rank
    masks = [p.name for p in out.iterdir() if p.name.endswith(".nii.gz")]
    assert sorted(masks) == sorted(p.name for p in images)
    with open(out / "summary.csv") as fp:  # written once every rank's cases had their record
        assert sorted(line.split(",")[0] for line in fp.read().splitlines()[1:]) == sorted(
            p.name.removesuffix(".nii.gz") for p in images)


# ---------------------------------------------------------------- settings carried by the model


def test_stored_settings_are_the_default_and_flags_override_one(tmp_path: Path, checkpoint_2mm: Path) -> None:
    from pipeline.inference.checkpoints import load_checkpoint, save_checkpoint
    from pipeline.inference.model import load_model
    from pipeline.inference.predictor import Predictor
    from pipeline.inference.settings import Overrides

    ckpt = load_checkpoint(checkpoint_2mm)
    ckpt["inference"] = {"mirror": True, "overlap": 0.5, "mode": "gaussian", "sw_batch_size": 3,
                         "postprocessing": {"foreground": False, "labels": [2]}}
    path = tmp_path / "validated.pt"
    save_checkpoint({k: v for k, v in ckpt.items() if k != "format"}, path)
    model = load_model(path, torch.device("cpu"))
    default = Predictor([model], torch.device("cpu"))
    engine = default.engines[0].settings
    assert (engine.mirror, engine.overlap, engine.batch_size) == (True, 0.5, 3)
    assert default.postprocessing.labels == (2,)
    changed = Predictor([model], torch.device("cpu"), Overrides(mirror=False, postprocess=False))
    assert changed.engines[0].settings.mirror is False and changed.engines[0].settings.overlap == 0.5
    assert not changed.postprocessing.active
    # An old checkpoint without stored settings: nnU-Net's defaults, mirroring on.
    del ckpt["inference"]
    save_checkpoint({k: v for k, v in ckpt.items() if k != "format"}, tmp_path / "old.pt")
    assert Predictor([load_model(tmp_path / "old.pt", torch.device("cpu"))], torch.device("cpu")).engines[0].settings.mirror

    image = str(_hippo_images(1)[0])
    mirrored = default([image], postprocess=False)[0]
    plain = changed([image])[0]
    assert (mirrored != plain).any()  # the stored mirroring really ran


def test_forced_fallback_gives_the_same_masks(tmp_path: Path, checkpoint_2mm: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    image = str(_hippo_images(1)[0])
    normal, capped = tmp_path / "normal", tmp_path / "capped"
    assert _predict("--model", str(checkpoint_2mm), image, "--out", str(normal), "--work-dir", str(tmp_path / "w")) == 0
    # At 2 mm the case is smaller than one window: one job. Its input, window and activations take 2.4 MB of
    # the simulated device; with the stitched logits and weights too, 2.9 MB: a 2.7 MB cap forces the fallback.
    with caplog.at_level("WARNING", logger="pipeline.inference.sliding_window"):
        assert _predict("--model", str(checkpoint_2mm), image, "--out", str(capped), "--work-dir", str(tmp_path / "w"),
                        "--device-memory-gb", str(2.7 / 1024)) == 0
    messages = [r.message for r in caplog.records]
    assert any("fallback: windows on cpu, stitching in host memory, 1 window(s)" in m for m in messages), messages
    name = Path(image).name
    np.testing.assert_array_equal(np.asarray(nib.load(normal / name).dataobj), np.asarray(nib.load(capped / name).dataobj))


# ---------------------------------------------------------------- memory-lean steps, same results


def test_class_by_class_inversion_equals_monais_on_a_resampled_series(tmp_path: Path) -> None:
    """The inversion one class at a time (memory) gives MONAI's all-class probabilities and their argmax.

    On the real oblique series with a 2 mm plan, so the inversion resamples and reorients; the
    probabilities are made with near-ties between classes, where the order of classes decides.
    """
    from monai.transforms import Invertd

    from pipeline.inference import class_argmax, load_model
    from pipeline.inference.predictor import Predictor

    series = dicom_series("pgbm003_t1post")
    model = load_model(save_untrained_2mm_model(tmp_path / "model.pt"), torch.device("cpu"))
    predictor = Predictor([model], torch.device("cpu"))
    d = predictor.load([series])
    image = d["image"]
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn((3, *image.shape[1:]), generator=generator)
    logits[2] = logits[1] + torch.where(torch.rand(logits[1].shape, generator=generator) < 0.3, 0.0, 1e-3)
    probs = torch.softmax(logits, 0)
    pred = image.__class__(probs.clone(), meta=image.meta, applied_operations=image.applied_operations)
    expected = Invertd(keys="pred", transform=predictor.chain, orig_keys="image", nearest_interp=False)(
        {**d, "pred": pred})["pred"].as_tensor()
    assert expected.shape[1:] != probs.shape[1:], "the series must be resampled for this test to mean anything"
    labels, kept = predictor._invert(d, probs.clone(), keep=True)
    assert kept is not None and np.array_equal(kept, expected.numpy())
    assert np.array_equal(labels, torch.argmax(expected, 0).numpy().astype(np.uint8))
    assert (labels == 1).any() and (labels == 2).any()
    assert torch.equal(class_argmax(probs).long(), torch.argmax(probs, 0))
    labels_only, none = predictor._invert(d, probs.clone(), keep=False)
    assert none is None and np.array_equal(labels_only, labels)
