"""Draw how RTSTRUCT contours become voxels (docs/data.md): one real hippocampus slice, two writers.

    .venv/bin/python scripts/contour_rule_figure.py            # writes docs/img/contour_rule.png (case 1, slice 18)
    .venv/bin/python scripts/contour_rule_figure.py --measure 10   # Dice per writer and outline tolerance

A shared hippocampus case (``../shared/data/hippocampus``) is written as a DICOM MR series
(``scripts/make_dicom_dataset.py``); its posterior hippocampus is written as an RTSTRUCT by rt-utils (contours
through the centres of boundary voxels, a one-point contour for a lone voxel) and by plastimatch (contours around
voxel edges), and each is read back by the pipeline's reader (``pipeline.data.dicom_labels``). Each panel shows
the mask the writer was given (grey squares), the contour points and outlines it wrote, and the voxels the
reader takes (dots): the same voxels from both.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import SimpleITK as sitk  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _maker():
    spec = importlib.util.spec_from_file_location("make_dicom_dataset", ROOT / "scripts" / "make_dicom_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(folder: Path, image: np.ndarray, masks: dict[str, np.ndarray], affine: np.ndarray,
           generator: bool = False) -> dict[str, Path]:
    """The MR series and ``masks`` (name -> mask, axes i, j, k) as RTSTRUCTs by rt-utils and plastimatch (and by
    the project's generator); writer -> file."""
    from rt_utils import RTStructBuilder

    maker = _maker()
    slices = maker.write_mr_series(image, affine, folder / "mr", "P0001", pydicom.uid.generate_uid(),
                                   datetime(2026, 1, 1))
    builder = RTStructBuilder.create_new(dicom_series_path=str(folder / "mr"))
    k_of = {str(s.SOPInstanceUID): k for k, s in enumerate(slices)}
    order = [k_of[str(s.SOPInstanceUID)] for s in builder.series_data]
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    (folder / "masks").mkdir()
    for name, mask in masks.items():
        builder.add_roi(mask=np.transpose(mask, (1, 0, 2))[:, :, order], name=name)
        itk_mask = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(mask, (2, 1, 0)).astype(np.uint8)))
        itk_mask.SetSpacing([float(s) for s in spacing])
        itk_mask.SetOrigin([float(x) for x in lps[:3, 3]])
        itk_mask.SetDirection([float(x) for x in (lps[:3, :3] / spacing).ravel()])
        sitk.WriteImage(itk_mask, str(folder / "masks" / f"{name}.nrrd"))
    builder.save(str(folder / "rt_utils.dcm"))
    subprocess.run([str(Path(sys.executable).parent / "plastimatch"), "convert", "--input-prefix",
                    str(folder / "masks"), "--referenced-ct", str(folder / "mr"), "--output-dicom",
                    str(folder / "plastimatch")], check=True, capture_output=True)
    written = {"rt-utils": folder / "rt_utils.dcm", "plastimatch": next((folder / "plastimatch").glob("rtss*.dcm"))}
    if generator:
        label = np.zeros(next(iter(masks.values())).shape, dtype=np.uint8)
        for value, mask in enumerate(masks.values(), start=1):
            label[mask] = value
        maker.write_rtstruct(label, slices, list(masks), folder / "generator.dcm", datetime(2026, 1, 1))
        written["generator"] = folder / "generator.dcm"
    return written


def measure(cases: int, tolerances: list[float]) -> None:
    """Print, per writer and outline tolerance, the lowest and mean Dice over structures and cases (the first
    ``cases`` hippocampus cases and two head-and-neck CT cases), and how far rt-utils' points lie from centres.

    Args:
        cases: how many hippocampus cases.
        tolerances: the outline tolerances to try (voxels).
    """
    import pipeline.data.dicom_labels as labels
    from transforms.dicom import read_dicom_series

    data = ROOT.parent / "shared" / "data"
    sets = [("hippocampus", ["Anterior", "Posterior"], cases), ("hn_ct", ["Brainstem", "SpinalCord", "RightParotid",
                                                                         "LeftParotid", "Mandible"], 2)]
    dice: dict[tuple[str, float], list[float]] = {}
    off_centre = 0.0
    for name, classes, n in sets:
        for entry in json.loads((data / name / "dataset.json").read_text())["training"][:n]:
            img, lab = nib.load(str(data / name / entry["image"])), nib.load(str(data / name / entry["label"]))
            label = np.asarray(lab.dataobj).astype(np.uint8)
            masks = {c: label == v for v, c in enumerate(classes, start=1) if (label == v).any()}
            with tempfile.TemporaryDirectory() as tmp:
                written = _write(Path(tmp), np.asarray(img.dataobj, dtype=np.float64), masks, img.affine, True)
                image = read_dicom_series(Path(tmp) / "mr")
                truth = np.transpose(label, (2, 1, 0))
                for writer, path in written.items():
                    header = labels.read_label_header(path)
                    for tol in tolerances:
                        labels.OUTLINE_TOL = tol
                        got = labels.rtstruct_label(header, image, labels.ClassMatcher(tuple(masks)), "")
                        for v, c in enumerate(masks, start=1):
                            t, g = truth == classes.index(c) + 1, got == v
                            dice.setdefault((writer, tol), []).append(2 * (t & g).sum() / (t.sum() + g.sum()))
                    if writer == "rt-utils":
                        inverse = np.linalg.inv(labels.image_affine_lps(image))
                        for roi in pydicom.dcmread(path).ROIContourSequence:
                            for contour in roi.ContourSequence:
                                xyz = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
                                index = (inverse @ np.column_stack([xyz, np.ones(len(xyz))]).T).T[:, :3]
                                off_centre = max(off_centre, float(np.abs(index - np.round(index)).max()))
    print("writer       tolerance  Dice min  Dice mean  (structures x cases)")
    for (writer, tol), values in dice.items():
        print(f"{writer:<12} {tol:9.2f}  {min(values):.4f}    {np.mean(values):.4f}     {len(values)}")
    print(f"rt-utils' contour points lie at most {off_centre:.2e} voxel from a voxel centre")


def _read(path: Path, image: sitk.Image) -> tuple[np.ndarray, list[np.ndarray]]:
    """What the pipeline reads (z, y, x) and each contour's points in (x, y, z) index coordinates."""
    from pipeline.data.dicom_labels import ClassMatcher, image_affine_lps, read_label_header, rtstruct_label

    label = rtstruct_label(read_label_header(path), image, ClassMatcher(("Posterior",)), "")
    inverse = np.linalg.inv(image_affine_lps(image))
    contours = []
    for contour in pydicom.dcmread(path).ROIContourSequence[0].ContourSequence:
        xyz = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        contours.append((inverse @ np.column_stack([xyz, np.ones(len(xyz))]).T).T[:, :3])
    return label, contours


def main() -> None:
    """Write the figure."""
    from transforms.dicom import read_dicom_series

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "hippocampus")
    p.add_argument("--case", type=int, default=1, help="index in dataset.json's training list")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "contour_rule.png")
    p.add_argument("--measure", type=int, metavar="N", help="instead of the figure: each writer's Dice per outline "
                   "tolerance on N hippocampus and 2 head-and-neck CT cases")
    p.add_argument("--tolerances", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.3, 0.4])
    args = p.parse_args()
    if args.measure:
        measure(args.measure, args.tolerances)
        return
    entry = json.loads((args.data / "dataset.json").read_text())["training"][args.case]
    img, lab = nib.load(str(args.data / entry["image"])), nib.load(str(args.data / entry["label"]))
    label = np.asarray(lab.dataobj).astype(np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        written = _write(Path(tmp), np.asarray(img.dataobj, dtype=np.float64), {"Posterior": label == 2}, img.affine)
        image = read_dicom_series(Path(tmp) / "mr")
        read = {writer: _read(path, image) for writer, path in written.items()}
    truth = np.transpose(label == 2, (2, 1, 0))  # (z, y, x), as the series was written (slice k at z = k)
    # The largest slice on which rt-utils wrote a one- or two-point contour (a speck or a line), else the largest.
    degenerate = sorted({int(round(c[0, 2])) for c in read["rt-utils"][1] if len(c) < 3})
    k = max(degenerate or range(truth.shape[0]), key=lambda z: int(truth[z].sum()))
    ys, xs = np.nonzero(truth[k] | read["rt-utils"][0][k].astype(bool))
    y0, y1, x0, x1 = ys.min() - 2, ys.max() + 3, xs.min() - 2, xs.max() + 3
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.6))
    for ax, (writer, (got, contours)) in zip(axes, read.items()):
        ax.imshow(truth[k], cmap="Greys", vmin=0, vmax=2.5, origin="upper",
                  extent=(-0.5, truth.shape[2] - 0.5, truth.shape[1] - 0.5, -0.5))
        for c in contours:
            if int(round(c[0, 2])) != k:
                continue
            closed = np.vstack([c[:, :2], c[:1, :2]])
            ax.plot(closed[:, 0], closed[:, 1], "-", color="tab:blue", lw=1.2)
            ax.plot(c[:, 0], c[:, 1], "o", color="tab:blue", ms=4 if len(c) >= 3 else 8, mfc="none")
        gy, gx = np.nonzero(got[k])
        ax.plot(gx, gy, ".", color="tab:red", ms=5)
        ax.set_xlim(x0 - 0.5, x1 - 0.5)
        ax.set_ylim(y1 - 0.5, y0 - 0.5)
        ax.set_xticks(np.arange(x0, x1) - 0.5, minor=True)  # the voxels' edges
        ax.set_yticks(np.arange(y0, y1) - 0.5, minor=True)
        ax.grid(which="minor", color="0.85", lw=0.5)
        ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
        equal = np.array_equal(got[k].astype(bool), truth[k])
        ax.set_title(f"{writer}: {len(gx)} voxels taken, {'all' if equal else 'not all'} of the mask's {int(truth[k].sum())}",
                     fontsize=9)
    fig.suptitle(f"Posterior hippocampus, {Path(entry['image']).name.split('.')[0]} slice {k}: mask (grey), contour "
                 "points and outline (blue), voxels taken (red dots)", fontsize=9)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"slice {k}; wrote {args.out}")


if __name__ == "__main__":
    main()
