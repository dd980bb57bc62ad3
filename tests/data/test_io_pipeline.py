"""Inputs through the whole pipeline: invertible preprocessing, DICOM geometry, bad inputs, channels, privacy.

Every geometry check compares against an independent reading of the source (nibabel or
SimpleITK), never against the pipeline's own reader.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml

from pipeline.cli import main
from tests.conftest import HIPPOCAMPUS, TINY, copy_hippocampus_subset, dicom_series, run_main

# Independent LPS <-> RAS flip (SimpleITK/DICOM speak LPS, nibabel/MONAI RAS).
FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


# ----------------------------------------------------------------------------- helpers


def _copy_series(name: str, dest: Path) -> Path:
    return Path(shutil.copytree(dicom_series(name), dest))


def _sitk_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _ras_affine(image: sitk.Image) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return FLIP @ affine


def _slices_by_position(folder: Path) -> list[Path]:
    """The series' files sorted along the slice normal (pydicom, not the pipeline's reader)."""
    rows = []
    for path in folder.iterdir():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
        rows.append((float(np.dot(np.cross(iop[:3], iop[3:]), np.asarray(ds.ImagePositionPatient, float))), path))
    return [p for _, p in sorted(rows)]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def _hippo_case(n: int = 0) -> tuple[Path, Path]:
    if not (HIPPOCAMPUS / "dataset.json").is_file():
        pytest.skip(f"real hippocampus data not found at {HIPPOCAMPUS} (see ../shared/data/README.md)")
    entry = json.loads((HIPPOCAMPUS / "dataset.json").read_text())["training"][n]
    return HIPPOCAMPUS / entry["image"], HIPPOCAMPUS / entry["label"]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real console entry point in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    assert res.returncode != 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, res.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def assert_no_files(folder: Path) -> None:
    assert not folder.exists() or not [p for p in folder.rglob("*") if p.is_file()], list(folder.rglob("*"))


def _write_config(path: Path, dataset: Path, **sections: dict) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["data"].update({"dataset": str(dataset), "synthetic_cases": 0})
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------- 1. preprocessing round trip (Invertd)


def _round_trip(image: Path, label: Path, target_spacing: list[float]) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Preprocess image+label with a RAS + resampling plan, then invert the label (nearest) as inference does."""
    from monai.transforms import Invertd

    from transforms.preprocessing import preprocessing

    plan = {"orientation": "RAS", "target_spacing": target_spacing, "normalization": ["zscore"], "ct_stats": [None]}
    chain = preprocessing(plan, with_label=True)
    d = chain({"image": [str(image)], "label": str(label)})
    resampled = d["label"]
    # The chain really resampled to the target grid (otherwise the round trip proves nothing).
    np.testing.assert_allclose(resampled.pixdim.numpy(), target_spacing, atol=1e-4)
    inverted = Invertd(keys="label", transform=chain, orig_keys="label", nearest_interp=True)(d)["label"]
    return np.asarray(inverted[0]), np.asarray(inverted.affine, dtype=np.float64), tuple(resampled.shape[1:])


def _assert_label_recovered(recovered: np.ndarray, truth: np.ndarray) -> None:
    assert recovered.shape == truth.shape
    values = [int(v) for v in np.unique(truth) if v != 0]
    assert values, "reference label is empty"
    assert set(np.unique(recovered).astype(int)) <= {0, *values}
    for v in values:
        assert _dice(recovered == v, truth == v) >= 0.99, f"label {v}: Dice {_dice(recovered == v, truth == v):.4f}"


def test_round_trip_oblique_dicom_series_with_mask() -> None:
    image, mask = dicom_series("pgbm003_t1post"), dicom_series("pgbm003_tumor_mask")
    ref = _sitk_series(mask)
    truth = sitk.GetArrayFromImage(ref).transpose(2, 1, 0)  # (z, y, x) -> (i, j, k)
    # Finer and anisotropic (0.43 x 0.43 x 6.5 mm -> 0.3 x 0.35 x 4.5 mm).
    recovered, affine, resampled_shape = _round_trip(image, mask, [0.3, 0.35, 4.5])
    assert resampled_shape != truth.shape
    np.testing.assert_allclose(affine, _ras_affine(ref), atol=1e-4)
    np.testing.assert_allclose(affine, _ras_affine(_sitk_series(image)), atol=1e-3)
    _assert_label_recovered(recovered, truth)


def test_round_trip_hippocampus_nifti_with_label() -> None:
    image, label = _hippo_case(0)
    src = nib.load(label)
    truth = np.asarray(src.dataobj)
    spacing = np.sqrt((src.affine[:3, :3] ** 2).sum(0))
    # Anisotropic and finer than the source on every axis.
    recovered, affine, resampled_shape = _round_trip(image, label, [float(s) for s in spacing * [0.6, 0.75, 0.5]])
    assert resampled_shape != truth.shape
    np.testing.assert_allclose(affine, src.affine, atol=1e-5)
    _assert_label_recovered(recovered, truth)


# ---------------------------------------------- 2. predict on an oblique DICOM series


def test_predict_oblique_dicom_series_keeps_series_geometry(tmp_path: Path, checkpoint_2mm: Path) -> None:
    series = dicom_series("pgbm003_t1post")
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(checkpoint_2mm), str(series), "--out", str(out),
                 "--work-dir", str(tmp_path / "w"), "--overlap", "0"]) == 0
    ref = _sitk_series(series)
    pred = sitk.ReadImage(str(out / "pgbm003_t1post.nii.gz"))
    assert pred.GetSize() == ref.GetSize() == (512, 512, 24)
    np.testing.assert_allclose(pred.GetSpacing(), ref.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(pred.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(pred.GetDirection(), ref.GetDirection(), atol=1e-4)
    assert abs(np.asarray(ref.GetDirection()).reshape(3, 3)[2, 1]) > 0.05  # really oblique
    nii = nib.load(out / "pgbm003_t1post.nii.gz")
    np.testing.assert_allclose(nii.affine, _ras_affine(ref), atol=1e-3)
    assert set(np.unique(np.asarray(nii.dataobj)).tolist()) <= {0, 1, 2}
    assert sorted(p.name for p in out.iterdir()) == [".thumbnails", *sorted(
        f"pgbm003_t1post{s}" for s in (".nii.gz", ".seg.dcm", ".sr.dcm", ".json")), "report.html", "summary.csv"]


# ------------------------------------------------------------------ 3. bad inputs (CLI)


def _predict(model: Path, inp: Path, out: Path, work: Path, console: bool = False) -> subprocess.CompletedProcess:
    runner = run_cli if console else run_main
    return runner("predict", "--model", str(model), str(inp), "--out", str(out), "--work-dir", str(work))


def test_cli_truncated_nifti(tmp_path: Path, tiny_checkpoint: Path) -> None:
    image, _ = _hippo_case(0)
    broken = tmp_path / "cut.nii.gz"
    data = image.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert_one_line_error(_predict(tiny_checkpoint, broken, out, tmp_path / "w", console=True), str(broken), "truncated")
    assert_no_files(out)


def test_cli_truncated_dicom_file_in_series(tmp_path: Path, tiny_checkpoint: Path) -> None:
    series = _copy_series("hippocrop_pgbm002", tmp_path / "series")
    victim = _slices_by_position(series)[10]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 1500])  # cut inside the pixel data
    out = tmp_path / "out"
    assert_one_line_error(_predict(tiny_checkpoint, series, out, tmp_path / "w"), str(victim), "truncated")
    assert_no_files(out)


def test_cli_folder_without_dicom(tmp_path: Path, tiny_checkpoint: Path) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here\n")
    out = tmp_path / "out"
    assert_one_line_error(_predict(tiny_checkpoint, folder, out, tmp_path / "w"), str(folder), "no DICOM series")
    assert_no_files(out)


def test_cli_missing_slice(tmp_path: Path, tiny_checkpoint: Path) -> None:
    series = _copy_series("hippocrop_pgbm002", tmp_path / "series")
    ordered = _slices_by_position(series)
    ordered[len(ordered) // 2].unlink()
    out = tmp_path / "out"
    assert_one_line_error(_predict(tiny_checkpoint, series, out, tmp_path / "w", console=True), str(series),
                          "missing slice")
    assert_no_files(out)


def test_cli_non_uniform_slice_spacing(tmp_path: Path, tiny_checkpoint: Path) -> None:
    series = _copy_series("hippocrop_pgbm002", tmp_path / "series")
    ordered = _slices_by_position(series)
    victim = ordered[len(ordered) // 2]
    ds = pydicom.dcmread(victim)
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    before = pydicom.dcmread(ordered[len(ordered) // 2 - 1], stop_before_pixels=True)
    gap = float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float) - np.asarray(before.ImagePositionPatient, float)))
    ds.ImagePositionPatient = [f"{v:.4f}" for v in np.asarray(ds.ImagePositionPatient, float) + 0.4 * gap * normal]
    ds.save_as(victim)
    out = tmp_path / "out"
    assert_one_line_error(_predict(tiny_checkpoint, series, out, tmp_path / "w"), str(series), "non-uniform slice spacing")
    assert_no_files(out)


def test_cli_nan_and_inf_intensities(tmp_path: Path, tiny_checkpoint: Path) -> None:
    image, _ = _hippo_case(0)
    src = nib.load(image)
    data = np.asarray(src.dataobj).astype(np.float32)
    data[3, 4, 5] = np.nan
    data[6, 7, 8] = np.inf
    bad = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, src.affine), bad)
    out = tmp_path / "out"
    assert_one_line_error(_predict(tiny_checkpoint, bad, out, tmp_path / "w"), str(bad), "1 NaN and 1 Inf")
    assert_no_files(out)


def test_cli_4d_image(tmp_path: Path, tiny_checkpoint: Path) -> None:
    image, _ = _hippo_case(0)
    src = nib.load(image)
    data = np.asarray(src.dataobj)
    bad = tmp_path / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), src.affine), bad)
    out = tmp_path / "out"
    assert_one_line_error(_predict(tiny_checkpoint, bad, out, tmp_path / "w"), str(bad), "4D")
    assert_no_files(out)


def _corrupt_dataset(tmp_path: Path, corrupt, index: int = -1) -> tuple[Path, Path, Path]:
    """Three real cases, one label (the last by default) rewritten by ``corrupt(data, affine) -> (data, affine)``."""
    if not (HIPPOCAMPUS / "dataset.json").is_file():
        pytest.skip(f"real hippocampus data not found at {HIPPOCAMPUS} (see ../shared/data/README.md)")
    dataset = copy_hippocampus_subset(tmp_path / "ds", 3)
    entry = json.loads(dataset.read_text())["training"][index]
    label = (dataset.parent / entry["label"]).resolve()
    src = nib.load(label)
    data, affine = corrupt(np.asarray(src.dataobj).copy(), src.affine.copy())
    nib.save(nib.Nifti1Image(data, affine), label)
    return dataset, label, _write_config(tmp_path / "tiny.yaml", dataset)


def _assert_nothing_preprocessed_for(work: Path, case_id: str) -> None:
    pre = work / "preprocessed"
    if pre.exists():
        assert not list(pre.glob(f"{case_id}*")), list(pre.iterdir())
        assert not [p for p in pre.rglob("*") if ".tmp" in p.name], list(pre.iterdir())


@pytest.mark.parametrize(
    ("corrupt", "needle"),
    [
        (lambda d, a: (d[:-1], a), "label shape"),
        (lambda d, a: (d, a @ np.array([[1, 0, 0, 4.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])), "affine"),
        (lambda d, a: (np.where(d == 2, 7, d).astype(d.dtype), a), "[7] not declared in dataset.json"),
    ],
    ids=["shape", "affine", "undeclared-label"],
)
def test_cli_preprocess_bad_label(tmp_path: Path, corrupt, needle: str) -> None:
    dataset, label, config = _corrupt_dataset(tmp_path, corrupt)
    work = tmp_path / "w"
    assert_one_line_error(run_main("preprocess", str(config), "--work-dir", str(work)), str(label), needle)
    _assert_nothing_preprocessed_for(work, label.name.removesuffix(".nii.gz"))


@pytest.mark.parametrize(
    ("corrupt", "needle"),
    [
        (lambda d, a: (d[:, :-2], a), "shape"),
        (lambda d, a: (d, a @ np.array([[1, 0, 0, 0], [0, 1, 0, 3.0], [0, 0, 1, 0], [0, 0, 0, 1]])), "affine"),
        (lambda d, a: (np.where(d == 2, 7, d).astype(d.dtype), a), "[7] that the model does not predict"),
    ],
    ids=["shape", "affine", "undeclared-label"],
)
def test_cli_evaluate_label_off_the_image_grid(tmp_path: Path, tiny_checkpoint: Path, corrupt, needle: str) -> None:
    dataset, label, _ = _corrupt_dataset(tmp_path, corrupt, index=0)
    out = tmp_path / "eval"
    res = run_main("evaluate", "--model", str(tiny_checkpoint), "--data", str(dataset), "--out", str(out),
                  "--work-dir", str(tmp_path / "w"), "--overlap", "0")
    assert_one_line_error(res, str(label), needle)
    assert_no_files(out)


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_cli_dataset_path_escaping_its_folder(tmp_path: Path, kind: str) -> None:
    image, label = _hippo_case(0)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(image, outside / "img.nii.gz")  # the escaping file exists: refused for where it is
    ds = tmp_path / "ds"
    (ds / "labelsTr").mkdir(parents=True)
    shutil.copy(label, ds / "labelsTr" / "img.nii.gz")
    rel = "../outside/img.nii.gz" if kind == "dotdot" else str(outside / "img.nii.gz")
    (ds / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"}, "modality": {"0": "MRI"},
        "training": [{"image": rel, "label": "./labelsTr/img.nii.gz"}] * 2,
    }))
    config = _write_config(tmp_path / "tiny.yaml", ds / "dataset.json")
    work = tmp_path / "w"
    needle = "escapes the dataset folder" if kind == "dotdot" else "is absolute"
    assert_one_line_error(run_main("preprocess", str(config), "--work-dir", str(work)), str(ds / "dataset.json"), needle)
    assert_no_files(work / "preprocessed")


# ------------------------------------------------------------- 4. multi-channel, end to end


@pytest.mark.slow
def test_two_channel_dataset_end_to_end(tmp_path: Path) -> None:
    from pipeline.data.demo import make_demo_dataset

    demo = make_demo_dataset(tmp_path / "demo", 4, [32, 32, 32], seed=3).parent
    ds = tmp_path / "two"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    training = []
    for img in sorted((demo / "imagesTr").glob("*.nii.gz")):
        case = img.name.removesuffix(".nii.gz")
        src = nib.load(img)
        mr = np.asarray(src.dataobj).astype(np.float32)
        nib.save(nib.Nifti1Image(mr, src.affine), ds / "imagesTr" / f"{case}_0000.nii.gz")
        # A CT-like second channel (Hounsfield-ish, negative) derived from the first.
        nib.save(nib.Nifti1Image(mr * 0.5 - 1000.0, src.affine), ds / "imagesTr" / f"{case}_0001.nii.gz")
        shutil.copy(demo / "labelsTr" / img.name, ds / "labelsTr" / img.name)
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    (ds / "dataset.json").write_text(json.dumps({
        "name": "TwoChannel", "modality": {"0": "MRI", "1": "CT"},
        "labels": json.loads((demo / "dataset.json").read_text())["labels"], "training": training,
    }))
    config = _write_config(tmp_path / "tiny.yaml", ds / "dataset.json",
                           train={"epochs": 2, "iterations_per_epoch": 2, "val_every": 1},
                           mlflow={"model_name": "tiny-2ch"})
    work = tmp_path / "work"
    assert main(["run", str(config), "--work-dir", str(work)]) == 0

    # plan.json was renamed plans.json (network plan added); accept either name.
    plan_file = next(p for p in (work / "preprocessed" / n for n in ("plans.json", "plan.json")) if p.is_file())
    plan = json.loads(plan_file.read_text())
    assert plan["normalization"] == ["zscore", "ct"]
    assert plan["modalities"] == {"0": "MRI", "1": "CT"}
    # Statistics per channel, not swapped: channel 1 is channel 0 * 0.5 - 1000.
    assert plan["ct_stats"][1]["mean"] < 0 < plan["ct_stats"][0]["mean"]
    assert plan["ct_stats"][1]["mean"] == pytest.approx(0.5 * plan["ct_stats"][0]["mean"] - 1000, rel=0.1)
    with np.load(next((work / "preprocessed").glob("demo_*.npz"))) as npz:
        assert npz["image"].shape[0] == 2

    c0, c1 = ds / "imagesTr" / "demo_001_0000.nii.gz", ds / "imagesTr" / "demo_001_0001.nii.gz"
    out = tmp_path / "pred"
    assert main(["predict", "--model", "models:/tiny-2ch@champion", str(c1), str(c0), "--out", str(out),
                 "--work-dir", str(work)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [".thumbnails", "demo_001.json", "demo_001.nii.gz", "report.html",
                                                     "summary.csv"]
    pred, src = nib.load(out / "demo_001.nii.gz"), nib.load(c0)
    assert pred.shape == src.shape
    np.testing.assert_allclose(pred.affine, src.affine, atol=1e-5)
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1, 2}
    # One channel alone is refused for a two-channel model, and nothing is written.
    res = run_main("predict", "--model", "models:/tiny-2ch@champion", str(c0), "--out",
                  str(tmp_path / "one"), "--work-dir", str(work))
    assert_one_line_error(res, str(c0), "1 channel file(s), the model takes 2")
    assert_no_files(tmp_path / "one")


# ------------------------------------------------------------------------------ 5. privacy


def _identifying_values(folders: list[Path]) -> tuple[set[str], set[str]]:
    """The identifying header values as stored (``raw``) and every form searched for (``forms``)."""
    raw_values: set[str] = set()
    values: set[str] = set()
    for folder in folders:
        for path in folder.iterdir():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            for tag in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName"):
                raw = str(ds.get(tag, "") or "").strip()
                if len(raw) >= 3:
                    raw_values.add(raw)
                forms = {raw, raw.replace("^", " "), " ".join(reversed(raw.split("^"))), *raw.split("^")}
                values |= {f.strip() for f in forms if len(f.strip()) >= 3}
    return raw_values, values


def _find(values: set[str], haystacks: list[tuple[str, bytes]]) -> list[str]:
    """``'value' in name`` for every value found (case-insensitive; UTF-8 and UTF-16 encodings)."""
    found = []
    for value in sorted(values):
        needles = {value.encode().lower(), value.encode("utf-16-le").lower()}
        found += [f"{value!r} in {name}" for name, hay in haystacks if any(n in hay for n in needles)]
    return found


@pytest.mark.slow
def test_no_patient_identifiers_leak(tmp_path: Path) -> None:
    t1, mask = dicom_series("pgbm003_t1post"), dicom_series("pgbm003_tumor_mask")
    hippo = dicom_series("hippocrop_pgbm002")
    ds = tmp_path / "ds"
    for case in ("case_a", "case_b"):
        shutil.copytree(t1, ds / "imagesTr" / case)
        shutil.copytree(mask, ds / "labelsTr" / case)
    extra = shutil.copytree(hippo, tmp_path / "inputs" / "series_c")  # a real-looking ^-separated name
    (ds / "dataset.json").write_text(json.dumps({
        "name": "Dicom", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "tumour"},
        "training": [{"image": f"./imagesTr/{c}", "label": f"./labelsTr/{c}"} for c in ("case_a", "case_b")],
    }))
    raw_values, values = _identifying_values([t1, mask, hippo])
    assert raw_values, "the series carry no identifying values: nothing to check"
    # Control: the search does find each stored value in the inputs it came from.
    sources = [(str(p), p.read_bytes().lower()) for p in (tmp_path / "ds").rglob("*") if p.is_file()]
    sources += [(str(p), p.read_bytes().lower()) for p in extra.iterdir()]
    assert all(_find({v}, sources) for v in raw_values)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = _write_config(tmp_path / "tiny.yaml", ds / "dataset.json",
                           data={"num_folds": 2}, preprocess={"target_spacing": [2.0, 2.0, 6.5]},
                           train={"epochs": 1, "iterations_per_epoch": 2, "val_every": 1, "patch_size": [32, 32, 16]},
                           mlflow={"model_name": "dicom-unet"})
    work = run_dir / "work"
    runs = [run_cli("run", str(config), "--work-dir", str(work), cwd=run_dir, timeout=400)]
    assert runs[0].returncode == 0, runs[0].stderr
    runs.append(run_cli("predict", "--model", "models:/dicom-unet@champion", str(ds / "imagesTr" / "case_a"),
                        str(extra), "--out", str(run_dir / "pred"), "--work-dir", str(work), cwd=run_dir))
    assert runs[1].returncode == 0, runs[1].stderr
    assert {p.name for p in (run_dir / "pred").iterdir()} == {
        f"{c}{s}" for c in ("case_a", "series_c") for s in (".nii.gz", ".seg.dcm", ".sr.dcm", ".json")} | {
        ".thumbnails", "report.html", "summary.csv"}
    for sub in ("mlflow.db", "mlartifacts", "preprocessed", "evaluation", "checkpoints"):
        assert (work / sub).exists(), sub

    # Work dir, predictions (records, summary, report), anything in the cwd; the DICOM SEGs and SRs are the
    # outputs that must carry the patient module (they belong in the patient's study).
    files = [p for p in run_dir.rglob("*") if p.is_file() and not p.name.endswith((".seg.dcm", ".sr.dcm"))]
    assert {"report.html", "summary.csv", "case_a.json"} <= {p.name for p in files}
    assert len(files) > 10
    haystacks = [(str(p), p.read_bytes().lower()) for p in files]
    haystacks += [(f"output of {r.args[3]}", (r.stdout + r.stderr).encode().lower()) for r in runs]
    leaks = _find(values, haystacks)
    assert not leaks, leaks


# ----------------------------------------------------------------------------- normalisation


def test_zscore_equals_monais_on_real_mri_and_keeps_zeros() -> None:
    """The in-place z-score (float64 sums, no boolean indexing) against MONAI's NormalizeIntensity."""
    import torch
    from monai.transforms import NormalizeIntensity

    from transforms.intensity import NormalizeChannelsd

    image, _ = _hippo_case()
    real = torch.as_tensor(np.asarray(nib.load(image).dataobj, dtype=np.float32))[None]
    background = real.clone()
    background[:, :10] = 0  # a zero border, as skull-stripped or cropped MRI has
    constant = torch.zeros(1, 6, 6, 6)
    constant[:, 2:4] = 7.0
    for volume in (real, background, constant, torch.zeros(1, 4, 4, 4)):
        before = volume.clone()
        ours = torch.as_tensor(NormalizeChannelsd("image", ["zscore"])({"image": volume})["image"])
        theirs = torch.as_tensor(NormalizeIntensity(nonzero=True)(volume.clone()))
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-6)
        assert bool((ours[volume == 0] == 0).all())  # zero voxels stay zero
        assert torch.equal(volume, before)  # a copy is normalised, not the caller's tensor
    nonzero = background[background != 0]
    assert nonzero.numel() < background.numel() and float(nonzero.std()) > 0  # the zero border is there
    stats = {"low": -100.0, "high": 200.0, "mean": 50.0, "std": 25.0}
    ct = torch.linspace(-1000, 1000, 64).reshape(1, 4, 4, 4)
    out = NormalizeChannelsd("image", ["ct"], [stats])({"image": ct})["image"]
    torch.testing.assert_close(torch.as_tensor(out), (ct.clamp(-100, 200) - 50) / 25)
    assert float(ct.min()) == -1000.0
