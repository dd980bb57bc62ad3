"""Build a small labelled CT dataset from the real chest CT series, for ``configs/ct_example.yaml``.

The shared data holds a real chest CT (``../shared/data/dicom/chest_ct``) but no CT
labels. This script reads the series with the pipeline's own DICOM reader (so Hounsfield
units and geometry are exactly what training sees), derives a lung mask (air-density
voxels, HU < -400, not connected to the air around the body, largest components kept)
and cuts the volume into non-overlapping slabs, each written as one NIfTI case with an
MSD ``dataset.json`` (modality CT, so the CT normalisation scheme is used).

    .venv/bin/python scripts/make_ct_example.py            # -> unet-work/ct_example/
    .venv/bin/unet-pipeline run configs/ct_example.yaml
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transforms.readers import affine_from_sitk, read_dicom_series  # noqa: E402

LUNG_HU = -400.0


def lung_mask(image: sitk.Image) -> sitk.Image:
    """Air-density voxels inside the body: the lungs (and central airways).

    Args:
        image: CT in Hounsfield units.
    """
    air = sitk.BinaryThreshold(image, lowerThreshold=-10000.0, upperThreshold=LUNG_HU, insideValue=1, outsideValue=0)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(air), sortByObjectSize=True)
    labels = sitk.GetArrayViewFromImage(components)
    # Components touching the in-plane border are the air around the patient.
    border = set(np.unique(labels[:, 0, :])) | set(np.unique(labels[:, -1, :]))
    border |= set(np.unique(labels[:, :, 0])) | set(np.unique(labels[:, :, -1]))
    keep = [c for c in range(1, int(labels.max()) + 1) if c not in border][:2]
    mask = np.isin(labels, keep).astype(np.uint8)
    out = sitk.GetImageFromArray(mask)
    out.CopyInformation(image)
    return sitk.BinaryMorphologicalClosing(out, [2, 2, 1])


def main(argv: list[str] | None = None) -> int:
    """Write the slabs and ``dataset.json``; returns the exit code.

    Args:
        argv: command-line arguments.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--series", type=Path, default=REPO.parent / "shared" / "data" / "dicom" / "chest_ct")
    p.add_argument("--out", type=Path, default=REPO / "unet-work" / "ct_example")
    p.add_argument("--slabs", type=int, default=6, help="cases cut along the slice axis (default 6)")
    args = p.parse_args(argv)
    if not args.series.is_dir():
        print(f"error: {args.series}: chest CT series not found (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    image = read_dicom_series(args.series)
    mask = lung_mask(image)
    ct = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.int16)  # (i, j, k)
    lab = sitk.GetArrayFromImage(mask).transpose(2, 1, 0)
    affine = affine_from_sitk(image)
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "imagesTr").mkdir(parents=True)
    (tmp / "labelsTr").mkdir(parents=True)
    bounds = np.linspace(0, ct.shape[2], args.slabs + 1).astype(int)
    training = []
    for n, (k0, k1) in enumerate(zip(bounds[:-1], bounds[1:])):
        slab_affine = affine.copy()
        slab_affine[:3, 3] = affine[:3, :3] @ np.array([0, 0, k0]) + affine[:3, 3]
        name = f"chest_{n:02d}.nii.gz"
        nib.save(nib.Nifti1Image(ct[:, :, k0:k1], slab_affine), tmp / "imagesTr" / name)
        nib.save(nib.Nifti1Image(lab[:, :, k0:k1], slab_affine), tmp / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {
        "name": "ChestCTLungs",
        "description": "Slabs of one real chest CT with HU-threshold lung masks (scripts/make_ct_example.py)",
        "tensorImageSize": "3D", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "lung"},
        "numTraining": len(training), "training": training,
    }
    (tmp / "dataset.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)
    print(f"{len(training)} CT cases with lung masks in {args.out} "
          f"(lung fraction {lab.mean():.3f}); now: unet-pipeline run configs/ct_example.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
