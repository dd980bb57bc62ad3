"""A hand-written MONAI baseline for any MSD-style task, written the way MONAI's tutorials do it.

The recipe is fixed on purpose (it is the "peer" our pipeline is compared against):

* ``BasicUNet(spatial_dims=3, in_channels=1, out_channels=classes + 1, features=(16, 16, 32, 64, 128, 16))``;
* ``DiceCELoss(to_onehot_y=True, softmax=True)`` and ``AdamW`` (lr 1e-3, weight decay 1e-5);
* small volumes (hippocampus) train whole: every volume is padded to one fixed size that holds the
  largest case (48 x 64 x 48 for MSD Task04), batch size 4, no patches;
* large volumes train on patches, as MONAI's spleen and BTCV tutorials do (``--patch``: the size a
  MONAI user picks, 96 x 96 x 64 for head-and-neck CT, 112 x 112 x 80 for the left atrium):
  ``RandCropByPosNegLabeld`` (pos 1, neg 1), ``--samples`` crops per volume, and validation by
  ``sliding_window_inference`` over windows of the patch size (overlap 0.25);
* MONAI transforms (``LoadImaged``, ``EnsureChannelFirstd``, ``Orientationd(RAS)``,
  ``NormalizeIntensityd(nonzero=True)``, light ``RandFlipd``/intensity augmentation),
  ``CacheDataset`` + ``DataLoader``;
* CT as MONAI's spleen and BTCV tutorials set it up (``--window A_MIN A_MAX``, ``--spacing X Y Z``):
  ``Spacingd`` to a fixed spacing, ``ScaleIntensityRanged`` clipping the window to [0, 1] instead of the
  z-score, and ``CropForegroundd`` to the body before the crops (half of them centred on foreground);
  the tutorials' window is -175..250 HU, their spacing 1.5 x 1.5 x 2 mm for abdominal CT;
* training stops at a wall-clock budget, checked after every iteration.

It validates on the same fold as our pipeline (:func:`pipeline.data.splits.kfold_splits`, case id =
label file name without ``.nii.gz``; ``--holdout FILE`` keeps a held-out test split out of the folds, as
``data.holdout`` does for a run, and ``--test`` scores those cases instead of the fold's): each validation
volume is predicted whole (padded), the
padding and reorientation are inverted with ``Invertd``, and Dice and HD95 per label are computed on
the case's original voxel grid against its label file, by the pipeline's own metric functions. Dice
is NaN for a label absent from both prediction and reference, and such cases are left out of that
label's mean.

Run from the repository root::

    .venv/bin/python scripts/monai_baseline.py --fold 0 --time-budget-minutes 20 --out unet-work/baseline
    .venv/bin/python scripts/monai_baseline.py --data ../shared/data/hn_ct --patch 96 96 64 --batch-size 1 \
        --window 849 1274 --spacing 3.906 3.906 2.5 --out unet-work/baseline-hn_ct

(hn_ct stores HU + 1024, so the tutorials' -175..250 HU window is 849..1274; its median spacing is
3.906 x 3.906 x 2.5 mm, already coarser than the tutorials' 1.5 x 1.5 x 2.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

try:
    from pipeline.data import kfold_splits, read_case_list
    from pipeline.evaluation.metrics import dice_per_label, surface_metrics, write_evaluation
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pipeline.data import kfold_splits, read_case_list
    from pipeline.evaluation.metrics import dice_per_label, surface_metrics, write_evaluation

warnings.filterwarnings("ignore", category=FutureWarning, module="monai")
warnings.filterwarnings("ignore", message=".*nvImageCodec.*")

DEFAULT_DATA = "../shared/data/hippocampus"
FEATURES = (16, 16, 32, 64, 128, 16)
DIVISOR = 16  # BasicUNet downsamples four times: padded sizes must be multiples of 16


def strip_nifti(name: str) -> str:
    """A file name without its ``.nii.gz``/``.nii`` suffix."""
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_dataset(data: Path) -> tuple[list[dict[str, str]], dict[int, str]]:
    """The labelled cases and the foreground label names of an MSD-style ``dataset.json``.

    Args:
        data: a folder holding ``dataset.json`` (or the file itself).

    Returns:
        ``[{"case", "image", "label"}]`` with absolute paths, and ``{value: name}`` without background.
    """
    json_path = data / "dataset.json" if data.is_dir() else data
    meta = json.loads(json_path.read_text())
    root = json_path.parent
    cases = []
    for entry in meta["training"]:
        image = (root / entry["image"]).resolve()
        label = (root / entry["label"]).resolve()
        cases.append({"case": strip_nifti(label.name), "image": str(image), "label": str(label)})
    labels = {int(k): str(v) for k, v in meta["labels"].items() if int(k) != 0}
    return cases, labels


def auto_spatial_size(cases: Sequence[dict[str, str]], divisor: int = DIVISOR) -> tuple[int, int, int]:
    """The smallest size (multiple of ``divisor``) that holds every image once reoriented to RAS.

    Reads only the NIfTI headers.
    """
    largest = [0, 0, 0]
    for case in cases:
        img = nib.load(case["image"])
        ornt = nib.orientations.io_orientation(img.affine)
        for axis in range(3):
            out = int(ornt[axis, 0])
            largest[out] = max(largest[out], int(img.shape[axis]))
    return tuple(int(math.ceil(s / divisor) * divisor) for s in largest)  # type: ignore[return-value]


def build_transforms(spatial_size: Sequence[int], train: bool, patch: bool = False, samples: int = 2,
                     window: Sequence[float] | None = None, spacing: Sequence[float] | None = None):
    """The MONAI transform chain: load, channel first, RAS, intensity, pad; flips when training.

    Args:
        spatial_size: the fixed padded size, or with ``patch`` the patch size.
        train: training (image + label, padded or cropped to the size, augmented) or
            validation (image only, padded; invertible).
        patch: train on random crops of ``spatial_size`` (half of them centred on foreground)
            instead of whole padded volumes.
        samples: crops per volume and iteration with ``patch``.
        window: ``(a_min, a_max)`` in stored intensity units: the CT tutorials' setting, the window
            clipped and scaled to [0, 1] and the volume cropped to its foreground (the body), instead
            of a z-score on the non-zero voxels.
        spacing: resample to this spacing in mm (``Spacingd``; bilinear image, nearest label) first.
    """
    from monai.transforms import (
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        EnsureTyped,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandScaleIntensityd,
        RandShiftIntensityd,
        ResizeWithPadOrCropd,
        ScaleIntensityRanged,
        Spacingd,
        SpatialPadd,
    )

    keys = ["image", "label"] if train else ["image"]
    chain: list[Any] = [
        LoadImaged(keys=keys, reader="NibabelReader", image_only=True),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS"),
    ]
    if spacing is not None:
        chain.append(Spacingd(keys=keys, pixdim=tuple(spacing), mode=("bilinear", "nearest")[: len(keys)]))
    if window is not None:
        chain += [ScaleIntensityRanged(keys="image", a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0,
                                       clip=True),
                  CropForegroundd(keys=keys, source_key="image")]
    else:
        chain.append(NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True))
    if train and patch:
        chain += [SpatialPadd(keys=keys, spatial_size=spatial_size),
                  RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=spatial_size, pos=1, neg=1,
                                         num_samples=samples)]
    elif train:
        chain.append(ResizeWithPadOrCropd(keys=keys, spatial_size=spatial_size))
    if train:
        chain += [
            RandFlipd(keys=keys, spatial_axis=[0], prob=0.1),
            RandFlipd(keys=keys, spatial_axis=[1], prob=0.1),
            RandFlipd(keys=keys, spatial_axis=[2], prob=0.1),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.1),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.1),
            EnsureTyped(keys=keys, track_meta=False),
        ]
    else:
        chain.append(SpatialPadd(keys="image", spatial_size=spatial_size))
    return Compose(chain)


def split_cases(cases: Sequence[dict[str, str]], held: set[str], num_folds: int, fold: int, seed: int,
                test: bool) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The training cases and the scored ones: the pipeline's fold of the cases not held out.

    Args:
        cases: every labelled case (``{"case", "image", "label"}``).
        held: the held-out test split's ids (kept out of the folds and training).
        num_folds: folds of the split.
        fold: the validation fold.
        seed: the split seed.
        test: score the held-out cases instead of the fold's validation cases.
    """
    pool = [c for c in cases if c["case"] not in held]
    val_ids = set(kfold_splits([c["case"] for c in pool], num_folds=num_folds, seed=seed)[fold]["val"])
    train = [c for c in pool if c["case"] not in val_ids]
    scored = [c for c in cases if c["case"] in held] if test else [c for c in pool if c["case"] in val_ids]
    return train, scored


def pick_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    return torch.device(name)


def train(
    network: torch.nn.Module, train_files: Sequence[dict[str, str]], spatial_size: Sequence[int],
    args: argparse.Namespace, device: torch.device,
) -> dict[str, float]:
    """Train on whole padded volumes until ``--max-epochs`` or the wall-clock budget, checked every iteration.

    Returns:
        ``epochs`` (begun; the last may be cut short by the budget), ``iterations``,
        ``train_seconds`` (the loop only) and ``cache_seconds``.
    """
    from monai.data import CacheDataset, DataLoader
    from monai.losses import DiceCELoss

    t0 = time.monotonic()
    transforms = build_transforms(spatial_size, train=True, patch=args.patch is not None, samples=args.samples,
                                  window=args.window, spacing=args.spacing)
    dataset = CacheDataset(train_files, transforms, cache_rate=1.0,
                           num_workers=max(1, args.threads or 1), progress=False)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        drop_last=len(dataset) > args.batch_size)
    cache_seconds = time.monotonic() - t0
    print(f"cached {len(dataset)} training volumes in {cache_seconds:.1f}s; {len(loader)} iterations per epoch")

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(network.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    budget = args.time_budget_minutes * 60.0 if args.time_budget_minutes else math.inf
    network.train()
    start = time.monotonic()
    epochs = iterations = 0
    out_of_time = False
    for epoch in range(args.max_epochs):
        epochs = epoch + 1
        epoch_loss, steps = 0.0, 0
        for batch in loader:
            image, label = batch["image"].to(device), batch["label"].to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(network(image), label)
            loss.backward()
            optimizer.step()
            epoch_loss += float(loss.item())
            steps += 1
            iterations += 1
            if time.monotonic() - start >= budget:
                out_of_time = True
                break
        elapsed = time.monotonic() - start
        print(f"epoch {epochs}: loss {epoch_loss / max(steps, 1):.4f} ({steps} it, {elapsed:.0f}s)", flush=True)
        if out_of_time:
            print(f"time budget of {args.time_budget_minutes} min reached after {iterations} iterations")
            break
    return {"epochs": epochs, "iterations": iterations, "train_seconds": time.monotonic() - start,
            "cache_seconds": cache_seconds}


@torch.no_grad()
def evaluate(
    network: torch.nn.Module, val_files: Sequence[dict[str, str]], labels: dict[int, str],
    spatial_size: Sequence[int], device: torch.device,
    window: Sequence[float] | None = None, spacing: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """Dice per label of each validation case on its original voxel grid.

    Each volume is predicted after padding by ``sliding_window_inference`` (whole-volume training: one
    window of the padded size, so a larger case would still be covered; patch training: windows of
    the patch, overlap 0.25), the argmax map is taken back through
    the padding and the reorientation with ``Invertd``, and compared to the label file as stored.
    With ``window``/``spacing`` (the CT setting) the foreground crop and the resampling are inverted too.
    """
    from monai.data import DataLoader, Dataset, MetaTensor, decollate_batch
    from monai.inferers import sliding_window_inference
    from monai.transforms import AsDiscreted, Compose, Invertd

    transforms = build_transforms(spatial_size, train=False, window=window, spacing=spacing)
    post = Compose([
        AsDiscreted(keys="pred", argmax=True),
        Invertd(keys="pred", transform=transforms, orig_keys="image", nearest_interp=True, to_tensor=True),
    ])
    loader = DataLoader(Dataset(list(val_files), transforms), batch_size=1, num_workers=0)
    network.eval()
    rows = []
    for batch, files in zip(loader, val_files):
        logits = sliding_window_inference(batch["image"].to(device), roi_size=spatial_size, sw_batch_size=1,
                                          predictor=network)
        batch["pred"] = MetaTensor(logits.cpu())  # Invertd only inverts MetaTensors (or keys with a trace)
        item = post(decollate_batch(batch)[0])
        pred = np.asarray(item["pred"][0]).astype(np.int64)
        truth = np.asanyarray(nib.load(files["label"]).dataobj).astype(np.int64)
        if pred.shape != truth.shape:
            raise RuntimeError(f"{files['case']}: prediction shape {pred.shape} != label shape {truth.shape}")
        scores = dice_per_label(pred, truth, list(labels))
        spacing = [float(z) for z in nib.load(files["label"]).header.get_zooms()[:3]]
        surface = surface_metrics(pred, truth, list(labels), spacing)
        rows.append({"case": files["case"], **{labels[v]: d for v, d in scores.items()},
                     **{f"hd95 {labels[v]}": surface[v]["hd95"] for v in labels}})
    return rows


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(description="Hand-written MONAI BasicUNet baseline (whole-volume training) "
                                            "on one fold of an MSD-style dataset.")
    p.add_argument("--data", type=Path, default=Path(DEFAULT_DATA), help=f"dataset folder (default {DEFAULT_DATA})")
    p.add_argument("--fold", type=int, default=0, help="validation fold (default 0)")
    p.add_argument("--num-folds", type=int, default=5, help="number of folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="split seed, and training seed unless --train-seed (default 0)")
    p.add_argument("--train-seed", type=int, default=None,
                   help="training seed (weights, sampling); default --seed. Seeds of one fold keep its split")
    p.add_argument("--time-budget-minutes", type=float, default=20.0,
                   help="training wall-clock cap in minutes, checked after every iteration (default 20; 0: none)")
    p.add_argument("--max-epochs", type=int, default=100000, help="epoch cap (default 100000)")
    p.add_argument("--batch-size", type=int, default=4, help="volumes per batch (default 4)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--weight-decay", type=float, default=1e-5, help="AdamW weight decay (default 1e-5)")
    p.add_argument("--spatial-size", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="padded volume size (default: smallest multiple of 16 holding every case; 48 64 48 here)")
    p.add_argument("--patch", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="train on random crops of this size, validate with sliding windows of it (default: whole "
                        "volumes); e.g. 96 96 64 for hn_ct, 112 112 80 for left_atrium")
    p.add_argument("--window", type=float, nargs=2, default=None, metavar=("A_MIN", "A_MAX"),
                   help="CT as MONAI's CT tutorials: clip this intensity window to [0, 1] and crop to the "
                        "foreground, instead of the z-score (default: z-score); 849 1274 for hn_ct (-175..250 HU "
                        "stored as HU + 1024)")
    p.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="resample to this spacing in mm first (default: none); e.g. 3.906 3.906 2.5 for hn_ct")
    p.add_argument("--holdout", type=Path, default=None, metavar="FILE",
                   help="case ids (one per line) kept out of the folds and training: a held-out test split, "
                        "e.g. configs/holdout/hippocampus.txt (default: none)")
    p.add_argument("--test", action="store_true",
                   help="score the --holdout cases instead of the fold's validation cases")
    p.add_argument("--samples", type=int, default=2,
                   help="with --patch: crops per volume per iteration, half on foreground (default 2)")
    p.add_argument("--out", type=Path, default=Path("unet-work/monai-baseline"),
                   help="output folder for summary.json and cases.csv (default unet-work/monai-baseline)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default 0: all cores)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Train, validate on the fold, write and print the results."""
    args = build_parser().parse_args(argv)
    from monai.networks.nets import BasicUNet
    from monai.utils import set_determinism

    args.threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(args.threads)
    args.train_seed = args.seed if args.train_seed is None else args.train_seed
    set_determinism(seed=args.train_seed)
    device = pick_device(args.device)

    cases, labels = load_dataset(args.data)
    if not 0 <= args.fold < args.num_folds:
        raise SystemExit(f"--fold must be in 0..{args.num_folds - 1}")
    held = set(read_case_list(args.holdout)) if args.holdout else set()
    if unknown := sorted(held - {c["case"] for c in cases}):
        raise SystemExit(f"{args.holdout}: names case(s) the dataset does not have: {', '.join(unknown[:3])}")
    if args.test and not held:
        raise SystemExit("--test scores the held-out cases: give them with --holdout FILE")
    train_files, val_files = split_cases(cases, held, args.num_folds, args.fold, args.seed, args.test)
    if args.spacing and not args.patch:
        raise SystemExit("--spacing needs --patch: whole-volume training pads to the sizes as stored")
    if args.patch:
        spatial_size = tuple(args.patch)
        shape = f"patches of {'x'.join(map(str, spatial_size))}, {args.samples} per volume"
    else:
        spatial_size = tuple(args.spatial_size) if args.spatial_size else auto_spatial_size(cases)
        shape = f"volumes padded to {'x'.join(map(str, spatial_size))}"
    if args.window:
        shape += f"; CT window {args.window[0]:g}..{args.window[1]:g} to [0, 1], cropped to the foreground"
    if args.spacing:
        shape += f"; resampled to {'x'.join(f'{v:g}' for v in args.spacing)} mm"
    scored = "held-out test" if args.test else "validation"
    print(f"fold {args.fold}/{args.num_folds}: {len(train_files)} training, {len(val_files)} {scored} case(s); "
          f"{shape}; device {device}, {args.threads} thread(s)")

    network = BasicUNet(spatial_dims=3, in_channels=1, out_channels=len(labels) + 1, features=FEATURES).to(device)
    facts = train(network, train_files, spatial_size, args, device)
    t0 = time.monotonic()
    rows = evaluate(network, val_files, labels, spatial_size, device, window=args.window, spacing=args.spacing)
    extra = {**facts, "eval_seconds": time.monotonic() - t0, "fold": args.fold, "num_folds": args.num_folds,
             "seed": args.seed, "train_seed": args.train_seed, "spatial_size": list(spatial_size),
             "patch": bool(args.patch), "samples": args.samples if args.patch else None,
             "window": args.window, "spacing": args.spacing, "held_out": len(held), "scored": scored,
             "batch_size": args.batch_size, "lr": args.lr,
             "device": str(device), "threads": args.threads}
    # Scored and written by the pipeline's own functions, so both sides of the benchmark count alike.
    summary = write_evaluation(rows, list(labels.values()), args.out, extra, metrics=("hd95",))

    width = max(len(n) for n in labels.values()) + 2
    where = "held-out test case(s)" if args.test else f"validation case(s) of fold {args.fold}"
    print(f"\nDice per label on {summary['num_cases']} {where}:")
    for name, value in summary["dice_per_label"].items():
        print(f"  {name:<{width}}{value:.4f}  HD95 {summary['hd95_per_label'][name]:.2f} mm")
    print(f"  {'mean':<{width}}{summary['mean_dice']:.4f}  HD95 {summary['mean_hd95']:.2f} mm")
    print(f"\n{summary['iterations']} iterations in {summary['epochs']} epoch(s), {summary['train_seconds']:.0f}s "
          f"training ({60 * summary['iterations'] / max(summary['train_seconds'], 1e-9):.1f} it/min); "
          f"results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
