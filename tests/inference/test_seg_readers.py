"""What the lab's tools see of this project's objects: the SEG ``predict``/``pacs predict`` write, read back by
dcmqi's ``segimage2itkimage`` (3D Slicer's QuantitativeReporting reads SEG through dcmqi) and by highdicom, and a
label ``dataset export`` writes, opened by ITK (Slicer's volume reader) on the DICOM series' own geometry.

Everything is compared in world space against what the project itself wrote, with the other tool's reader.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.cli import main
from tests.conftest import HIPPOCAMPUS, REPO, dicom_dataset_maker, dicom_series, run_main, save_untrained_2mm_model

SEGIMAGE2ITKIMAGE = shutil.which("segimage2itkimage") or str(Path(REPO / ".venv" / "bin" / "segimage2itkimage"))


@pytest.fixture(scope="module")
def prediction(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``predict`` on the real oblique 512 x 512 x 24 MR series: its mask (NIfTI) and its SEG."""
    series = dicom_series("pgbm003_t1post")
    tmp = tmp_path_factory.mktemp("readers")
    ckpt = save_untrained_2mm_model(tmp / "model.pt")
    out = tmp / "out"
    assert main(["predict", "--model", str(ckpt), str(series), "--out", str(out), "--work-dir", str(tmp / "w")]) == 0
    return {"series": series, "nifti": out / "pgbm003_t1post.nii.gz", "seg": out / "pgbm003_t1post.seg.dcm",
            "tmp": tmp}


def _on_grid(image: sitk.Image, reference: sitk.Image) -> np.ndarray:
    """``image`` placed on ``reference``'s grid by nearest neighbour (a pure re-indexing when the grids agree)."""
    return sitk.GetArrayFromImage(sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0))


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5))


def test_dcmqi_reads_our_seg_as_the_mask_we_wrote(prediction: dict) -> None:
    if not Path(SEGIMAGE2ITKIMAGE).is_file():
        pytest.skip("dcmqi's segimage2itkimage is not installed (pip install dcmqi: the test extra has it)")
    out = prediction["tmp"] / "dcmqi"
    out.mkdir()
    done = subprocess.run([SEGIMAGE2ITKIMAGE, "--inputDICOM", str(prediction["seg"]), "--outputDirectory", str(out),
                           "-t", "nii"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    meta = json.loads((out / "meta.json").read_text())
    labels = {s["labelID"]: s["SegmentLabel"] for group in meta["segmentAttributes"] for s in group}
    assert sorted(labels.values()) == ["enhancing", "oedema"]
    ours = sitk.ReadImage(str(prediction["nifti"]))  # ITK reads our NIfTI in LPS, as Slicer does
    mask = sitk.GetArrayFromImage(ours)
    assert (mask > 0).any()
    for n, (_value, name) in enumerate(sorted(labels.items()), start=1):
        segment = sitk.ReadImage(str(out / f"{n}.nii"))
        # dcmqi writes each segment on the frames' own geometry (the SEG's slices): equal on our mask's grid.
        theirs = _on_grid(segment, ours) > 0
        expected = mask == {"enhancing": 1, "oedema": 2}[name]
        assert theirs.sum() == expected.sum() > 0, name
        assert np.array_equal(theirs, expected), name


def test_highdicom_reads_our_seg_as_the_mask_we_wrote_in_world_space(prediction: dict) -> None:
    import highdicom as hd

    seg = hd.seg.segread(prediction["seg"])
    volume = seg.get_volume(combine_segments=True, relabel=True)
    nifti = nib.load(prediction["nifti"])
    mask = np.asarray(nifti.dataobj)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS (NIfTI) <-> LPS (DICOM)
    found = np.argwhere(volume.array > 0)
    world = volume.affine @ np.column_stack([found, np.ones(len(found))]).T  # LPS mm of each SEG voxel
    index = np.rint((np.linalg.inv(nifti.affine) @ flip @ world)[:3].T).astype(int)
    names = [seg.get_segment_description(n).segment_label for n in seg.segment_numbers]
    values = np.array([{"enhancing": 1, "oedema": 2}[names[v - 1]] for v in volume.array[tuple(found.T)]])
    assert len(index) == int((mask > 0).sum()) > 0
    assert np.array_equal(mask[tuple(index.T)], values)


def test_an_exported_label_opens_in_itk_on_the_dicom_series_geometry(tmp_path: Path) -> None:

    if not (HIPPOCAMPUS / "dataset.json").is_file():
        pytest.skip(f"real hippocampus data not found at {HIPPOCAMPUS} (see ../shared/data/README.md)")
    maker = dicom_dataset_maker()
    entry = json.loads((HIPPOCAMPUS / "dataset.json").read_text())["training"][0]
    source = tmp_path / "src"
    maker.make_study(HIPPOCAMPUS / entry["image"], HIPPOCAMPUS / entry["label"], source, ["Anterior", "Posterior"],
                     0, "SEG", 25)  # a series tilted by 25 degrees: any axis or sign slip shows
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  dataset: {source}\n  classes: [Anterior, Posterior]\n")
    result = run_main("dataset", "export", str(source), "--config", str(cfg), "--out", str(tmp_path / "out"),
                      "--work-dir", str(tmp_path / "w"))
    assert result.returncode == 0, result.stderr
    case = json.loads((tmp_path / "out" / "manifest.json").read_text())["cases"][0]["case"]
    label = sitk.ReadImage(str(tmp_path / "out" / "labelsTr" / f"{case}.nii.gz"))
    image = sitk.ReadImage(str(tmp_path / "out" / "imagesTr" / f"{case}_0000.nii.gz"))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(source / "study_0000" / "mr")))
    series = reader.Execute()
    assert _same_grid(label, series) and _same_grid(image, series)
    truth = nib.load(HIPPOCAMPUS / entry["label"])
    assert int((sitk.GetArrayFromImage(label) > 0).sum()) == int((np.asarray(truth.dataobj) > 0).sum())
