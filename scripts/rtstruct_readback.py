"""RTSTRUCT out, read back: Dice per structure of the project's RTSTRUCT writer (and rt-utils' for comparison)
read by this project, by rt-utils and by plastimatch, against the masks they were written from.

Real label maps stand for predictions: hippocampus MR cases (slices padded square: rt-utils' reader needs them)
and head-and-neck CT cases, as DICOM series made by ``scripts/make_dicom_dataset.py``. The figures on the PACS
docs page come from

    .venv/bin/python scripts/rtstruct_readback.py --hippocampus 4 --ct 2 --out /tmp/rtstruct-readback
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.data.dicom_labels import (  # noqa: E402
    ClassMatcher,
    image_affine_lps,
    place_on_grid,
    read_label_header,
    rtstruct_label,
)
from pipeline.inference import Algorithm, write_dicom_rtstruct  # noqa: E402
from transforms.dicom import read_dicom_series  # noqa: E402

DATA = REPO.parent / "shared" / "data"
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _maker():
    spec = importlib.util.spec_from_file_location("make_dicom_dataset", REPO / "scripts" / "make_dicom_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1 when both are empty).

    Args:
        a: one mask.
        b: the other, same shape.
    """
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def read_back(folder: Path, rtstruct: Path, slices: list, label: np.ndarray, affine_ras: np.ndarray,
              classes: list[str], out: Path) -> dict[str, dict[str, float]]:
    """Dice per reader and structure of one RTSTRUCT on its series.

    Args:
        folder: the image series folder.
        rtstruct: the RTSTRUCT file.
        slices: the series' datasets in the label map's k order.
        label: the label map it was written from (i, j, k).
        affine_ras: the label map's voxel -> RAS map.
        classes: ROI names, label 1 first.
        out: scratch folder for plastimatch's output.
    """
    from rt_utils import RTStructBuilder

    image = read_dicom_series(folder, slices[0].SeriesInstanceUID)
    reference = image_affine_lps(image)
    truth = place_on_grid(label, LPS @ affine_ras, reference, image.GetSize(), "truth")
    header = read_label_header(rtstruct)
    project = np.transpose(rtstruct_label(header, image, ClassMatcher(tuple(classes)), slices[0].FrameOfReferenceUID),
                           (2, 1, 0))
    rt = RTStructBuilder.create_from(str(folder), str(rtstruct))
    k_of = {s.SOPInstanceUID: k for k, s in enumerate(slices)}
    order = [k_of[s.SOPInstanceUID] for s in rt.series_data]
    plastimatch = shutil.which("plastimatch") or str(Path(sys.executable).parent / "plastimatch")
    subprocess.run([plastimatch, "convert", "--input", str(rtstruct), "--referenced-ct", str(folder),
                    "--output-prefix", str(out), "--prefix-format", "nrrd"], check=True, capture_output=True)
    result: dict[str, dict[str, float]] = {"project": {}, "rt-utils": {}, "plastimatch": {}}
    for value, name in enumerate(classes, start=1):
        result["project"][name] = dice(truth == value, project == value)
        planes = np.stack([label[:, :, k].T == value for k in order], axis=-1)
        result["rt-utils"][name] = dice(planes, rt.get_roi_mask_by_name(name))
        structure = sitk.ReadImage(str(out / f"{name}.nrrd"))
        mask = (np.transpose(sitk.GetArrayFromImage(structure), (2, 1, 0)) > 0).astype(np.uint8)
        placed = place_on_grid(mask, image_affine_lps(structure), reference, image.GetSize(), "plastimatch")
        result["plastimatch"][name] = dice(truth == value, placed > 0)
    return result


def main() -> None:
    """Write, read back and print one line per case, writer and reader."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hippocampus", type=int, default=4, help="how many hippocampus cases (the first)")
    p.add_argument("--ct", type=int, default=2, help="how many head-and-neck CT cases (the first)")
    p.add_argument("--out", type=Path, required=True, help="scratch folder (replaced)")
    p.add_argument("--rt-utils-writer", action="store_true", help="also write each case with rt-utils' add_roi")
    args = p.parse_args()
    from rt_utils import RTStructBuilder

    maker = _maker()
    shutil.rmtree(args.out, ignore_errors=True)
    cases = []
    hippo = json.loads((DATA / "hippocampus" / "dataset.json").read_text())["training"][: args.hippocampus]
    for entry in hippo:
        img = nib.load(str(DATA / "hippocampus" / entry["image"]))
        volume = np.asarray(img.dataobj, dtype=np.float64)
        label = np.asarray(nib.load(str(DATA / "hippocampus" / entry["label"])).dataobj).astype(np.uint8)
        side = max(volume.shape[:2])
        pad = [(0, side - volume.shape[0]), (0, side - volume.shape[1]), (0, 0)]
        cases.append((Path(entry["image"]).name.split(".")[0], np.pad(volume, pad), np.pad(label, pad), img.affine,
                      ["Anterior", "Posterior"], "MR"))
    for entry in json.loads((DATA / "hn_ct" / "dataset.json").read_text())["training"][: args.ct]:
        volume, label, affine = maker.hn_ct_case(DATA / "hn_ct" / entry["image"], DATA / "hn_ct" / entry["label"])
        cases.append((Path(entry["image"]).name.split(".")[0], volume, label, affine,
                      ["Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Mandible"], "CT"))
    algorithm = Algorithm("readback", "1", "unet-pipeline")
    for name, volume, label, affine, classes, modality in cases:
        folder = args.out / name / "image"
        slices = maker.write_mr_series(volume, affine, folder, "P1", pydicom.uid.generate_uid(), datetime(2026, 1, 1),
                                       modality=modality)
        by_uid = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in folder.iterdir()}
        writers = {"project": write_dicom_rtstruct(label, [by_uid[s.SOPInstanceUID] for s in slices],
                                                   dict(enumerate(classes, start=1)), algorithm,
                                                   args.out / name / "project.dcm")}
        if args.rt_utils_writer:
            rt = RTStructBuilder.create_new(str(folder))
            k_of = {s.SOPInstanceUID: k for k, s in enumerate(slices)}
            order = [k_of[s.SOPInstanceUID] for s in rt.series_data]
            for value, roi in enumerate(classes, start=1):
                rt.add_roi(mask=np.stack([label[:, :, k].T == value for k in order], axis=-1), name=roi)
            rt.save(str(args.out / name / "rt-utils.dcm"))
            writers["rt-utils"] = args.out / name / "rt-utils.dcm"
        for writer, path in writers.items():
            result = read_back(folder, path, slices, label, affine, classes, args.out / name / f"plastimatch-{writer}")
            for reader, per_class in result.items():
                print(f"{name:<18} writer {writer:<9} reader {reader:<12} "
                      + "  ".join(f"{roi} {d:.4f}" for roi, d in per_class.items()))


if __name__ == "__main__":
    main()
