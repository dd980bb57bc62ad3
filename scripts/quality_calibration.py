"""The quality estimate measured on a finished run: how well it ranks the validation cases, what the flag
catches, and whether out-of-domain inputs are flagged.

Re-validates the fold's ``final.pt`` exactly as ``run`` does at its end (``validate_and_export``:
evaluation with the stored settings, postprocessing decision, calibration fitted on the same
validation cases, ``model.pt`` written), then prints:

* Spearman's rho between estimated and true mean Dice, in-sample and leave-one-out;
* how many cases the flag marks, and how many of the 5 worst (true mean Dice) it catches,
  with in-sample and with leave-one-out estimates;
* for each out-of-domain input given (``--ood``), whether it conforms and why not.

Usage (after ``unet-pipeline run configs/hippocampus.yaml --set train.time_budget_minutes=20``)::

    python scripts/quality_calibration.py --work-dir unet-work --data ../shared/data/hippocampus \\
        --ood ../shared/data/dicom/chest_ct ../shared/data/dicom/pgbm003_t1post --thick-slices hippocampus_037
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _flags(estimates: np.ndarray, threshold_quantile: float, worst: set[int]) -> tuple[int, int]:
    lowest = estimates.min(axis=1)
    flagged = set(np.where(lowest < np.quantile(lowest, threshold_quantile))[0].tolist())
    return len(flagged), len(flagged & worst)


def _leave_one_out(signals: list, truth: list, values: list[int]) -> np.ndarray:
    from pipeline.quality.calibration import _fit_label, _matrix

    n = len(signals)
    out = np.zeros((n, len(values)))
    for j, value in enumerate(values):
        y = np.array([t[value] for t in truth])
        for i in range(n):
            rest = [k for k in range(n) if k != i]
            estimate = _fit_label(_matrix(signals, value, rest), y[rest], 1.0).estimate(signals[i][value])
            out[i, j] = np.nan if estimate is None else estimate
    return out


def _thick_slices(src: Path, dst: Path, slice_mm: float) -> Path:
    """A real scan resampled (linear, SimpleITK) to ``slice_mm`` along its third axis."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(src))
    spacing, size = list(image.GetSpacing()), list(image.GetSize())
    new_size = [size[0], size[1], int(round(size[2] * spacing[2] / slice_mm))]
    out = sitk.Resample(image, new_size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                        [spacing[0], spacing[1], slice_mm], image.GetDirection(), 0.0, image.GetPixelID())
    sitk.WriteImage(out, str(dst))
    return dst


def _conformity(model, inputs: list[Path]) -> None:  # noqa: ANN001
    from pipeline.quality import check_conformity
    from transforms.preprocessing import preprocessing

    chain = preprocessing(model.plan, with_label=False)
    for path in inputs:
        image = chain({"image": [str(path)]})["image"]
        result = check_conformity(model.plan["fingerprint"], np.asarray(image.meta["original_affine"]),
                                  [int(s) for s in image.meta["spatial_shape"]], image.numpy(), image.meta.get("modality"))
        print(f"  {path.name}: {'conforms' if result.conforms else 'FLAGGED: ' + '; '.join(result.reasons)}")


def main() -> None:
    """Parse the arguments, re-validate, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, required=True, help="the run's work directory")
    parser.add_argument("--data", required=True, help="the run's dataset.json or its folder")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--flag-quantile", type=float, default=None, help="default: the config default (qc.flag_quantile)")
    parser.add_argument("--ood", nargs="*", type=Path, default=[], help="out-of-domain inputs to check")
    parser.add_argument("--thick-slices", default=None, help="a case to resample to 3 mm slices and check")
    args = parser.parse_args()

    import torch
    from scipy.stats import spearmanr

    from pipeline.config import QcConfig
    from pipeline.data import load_dataset
    from pipeline.evaluation import validate_and_export
    from pipeline.inference import InferenceSettings, load_model

    quantile = args.flag_quantile if args.flag_quantile is not None else QcConfig().flag_quantile
    dataset = load_dataset(args.data)
    split = json.loads((args.work_dir / "splits.json").read_text())["folds"][args.fold]
    cases = [c for c in dataset.cases if c.case_id in set(split["val"])]
    final = args.work_dir / "checkpoints" / f"fold_{args.fold}" / "final.pt"
    plan = torch.load(final, weights_only=True)["plan"]
    evaluation, model_path, _ = validate_and_export(InferenceSettings(), torch.device("cpu"), plan, cases, final,
                                                    args.work_dir / "evaluation_quality", flag_quantile=quantile)
    records = evaluation.records
    values = sorted({e["value"] for e in records[0]["labels"].values()})
    signals = [{e["value"]: e["signals"] for e in r["labels"].values()} for r in records]
    truth = [{e["value"]: e["true_dice"] for e in r["labels"].values()} for r in records]
    true_mean = np.array([r["true_mean_dice"] for r in records])
    in_sample = np.array([[e["estimated_dice"] for e in r["labels"].values()] for r in records], dtype=float)
    loo = _leave_one_out(signals, truth, values)
    worst = set(np.argsort(true_mean)[:5].tolist())
    print(f"{len(records)} validation cases, mean Dice {evaluation.summary['mean_dice']:.4f}; "
          f"flag quantile {quantile}, min_expected_dice {evaluation.calibration.min_expected_dice:.4f}")
    for name, est in (("in-sample", in_sample), ("leave-one-out", loo)):
        flagged, caught = _flags(est, quantile, worst)
        rho = spearmanr(est.mean(axis=1), true_mean)[0]
        print(f"  {name:14s} Spearman rho {rho:.3f}; flagged {flagged}/{len(records)} ({flagged / len(records):.0%}), "
              f"{caught} of the 5 worst")
    print(f"  flagged by the stored model: {sum(r['flagged'] for r in records)}; model written to {model_path}")
    model = load_model(model_path, torch.device("cpu"))
    inputs = list(args.ood)
    with tempfile.TemporaryDirectory() as tmp:
        if args.thick_slices:
            scan = next(c for c in dataset.cases if c.case_id == args.thick_slices).images[0]
            inputs.append(_thick_slices(scan, Path(tmp) / f"{args.thick_slices}_3mm.nii.gz", 3.0))
        print("out-of-domain inputs:")
        _conformity(model, inputs)


if __name__ == "__main__":
    main()
