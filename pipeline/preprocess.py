"""The preprocess stage: dataset fingerprint, preprocessing plan, cached preprocessed cases."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import PipelineConfig
from pipeline.dataset import Case, Dataset
from pipeline.devices import resolve_device
from pipeline.errors import InputDataError
from pipeline.planning import plan_network
from transforms.preprocessing import load_transforms, preprocessing, spatial_transforms

FOREGROUND_SAMPLES_PER_CASE = 10_000


@dataclass
class PreprocessedCase:
    """A case on disk in the plan's voxel space.

    Args:
        case_id: the case's name.
        path: ``.npz`` file holding ``image`` (C, X, Y, Z) float32 and ``label`` (1, X, Y, Z) uint8.
    """

    case_id: str
    path: Path

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Read the image and label tensors."""
        with np.load(self.path) as npz:
            return torch.from_numpy(npz["image"]), torch.from_numpy(npz["label"])


def _inputs_key(cases: list[Case]) -> str:
    """A hash of every input file's path, size and modification time (cache invalidation)."""
    h = hashlib.sha256()
    for case in cases:
        for f in [*case.images, case.label]:
            files = sorted(f.rglob("*")) if f.is_dir() else [f]
            for g in files:
                st = g.stat()
                h.update(f"{g}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _check_pair(case: Case, image: torch.Tensor, label: torch.Tensor, labels: dict[int, str]) -> None:
    """Image and label must share a voxel grid, and the label may only hold declared values."""
    if tuple(image.shape[1:]) != tuple(label.shape[1:]):
        raise InputDataError(
            case.label, f"label shape {tuple(label.shape[1:])} differs from image shape {tuple(image.shape[1:])}"
        )
    if not np.allclose(image.affine.numpy(), label.affine.numpy(), atol=1e-3):
        raise InputDataError(case.label, "label affine (orientation/spacing/origin) differs from the image's")
    if labels:
        found = set(torch.unique(label).long().tolist())
        undeclared = sorted(found - set(labels))
        if undeclared:
            raise InputDataError(
                case.label, f"holds label value(s) {undeclared} not declared in dataset.json (declared: {sorted(labels)})"
            )


def compute_fingerprint(dataset: Dataset, orientation: str) -> dict[str, Any]:
    """Spacings and shapes (after reorientation) and foreground intensity statistics per channel.

    Args:
        dataset: the discovered dataset.
        orientation: axis codes the spacings/shapes are reported in.
    """
    loader = load_transforms(with_label=True)
    reorient = spatial_transforms({"orientation": orientation, "target_spacing": None}, True)[0]
    rs = np.random.RandomState(0)
    spacings, shapes = [], []
    samples: list[list[np.ndarray]] = [[] for _ in dataset.modalities]
    for case in tqdm(dataset.cases, desc="fingerprint", unit="case", leave=False):
        d = reorient(loader({"image": [str(p) for p in case.images], "label": str(case.label)}))
        image, label = d["image"], d["label"]
        _check_pair(case, image, label, dataset.labels)
        spacings.append([float(s) for s in image.pixdim])
        shapes.append([int(s) for s in image.shape[1:]])
        mask = label[0].numpy() > 0
        for c in range(image.shape[0]):
            fg = image[c].numpy()[mask]
            if fg.size > FOREGROUND_SAMPLES_PER_CASE:
                fg = rs.choice(fg, FOREGROUND_SAMPLES_PER_CASE, replace=False)
            samples[c].append(fg.astype(np.float64))
    stats = []
    for c in range(len(dataset.modalities)):
        v = np.concatenate(samples[c]) if samples[c] else np.zeros(1)
        stats.append({
            "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max()),
            "median": float(np.median(v)),
            "percentile_00_5": float(np.percentile(v, 0.5)), "percentile_99_5": float(np.percentile(v, 99.5)),
        })
    return {
        "num_cases": len(dataset.cases),
        "orientation": orientation,
        "spacings": spacings,
        "shapes": shapes,
        "median_spacing": [float(x) for x in np.median(spacings, axis=0)],
        "median_shape": [float(x) for x in np.median(shapes, axis=0)],
        "foreground_intensity": stats,
    }


def make_plan(cfg: PipelineConfig, dataset: Dataset, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The plan: orientation, target spacing, per-channel normalisation, and the network/patch/batch plan.

    Config values override what the fingerprint suggests.

    Args:
        cfg: the pipeline configuration.
        dataset: the discovered dataset (modalities and labels).
        fingerprint: from :func:`compute_fingerprint`.
    """
    schemes = []
    for c in sorted(dataset.modalities):
        if cfg.preprocess.normalization != "auto":
            schemes.append(cfg.preprocess.normalization)
        else:
            schemes.append("ct" if dataset.modalities[c].strip().upper() == "CT" else "zscore")
    ct_stats = [
        {"low": s["percentile_00_5"], "high": s["percentile_99_5"], "mean": s["mean"], "std": s["std"]}
        for s in fingerprint["foreground_intensity"]
    ]
    target_spacing = cfg.preprocess.target_spacing or fingerprint["median_spacing"]
    device = resolve_device(cfg.train.device)
    memory = cfg.train.memory_budget_gb
    if memory is None and device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory / 2**30
    network = plan_network(fingerprint, target_spacing, cfg.model.spatial_dims, device.type, memory)
    # Values set in the config win over the planner's.
    for key, value in (("patch_size", cfg.train.patch_size), ("batch_size", cfg.train.batch_size),
                       ("features", cfg.model.features)):
        if value is not None:
            network[key] = value
    return {
        "orientation": cfg.preprocess.orientation,
        "target_spacing": target_spacing,
        "normalization": schemes,
        "ct_stats": ct_stats,
        "modalities": {str(k): v for k, v in dataset.modalities.items()},
        "labels": {str(k): v for k, v in sorted(dataset.labels.items())},
        "network": network,
    }


def preprocess_dataset(cfg: PipelineConfig, dataset: Dataset, out_dir: Path) -> tuple[dict, list[PreprocessedCase]]:
    """Fingerprint, plan and preprocess every case into ``out_dir``, reusing what is up to date.

    A case is redone only when its inputs or the plan changed. Files are written
    under a temporary name and renamed, so an interrupted run leaves no partial case.

    Args:
        cfg: the pipeline configuration.
        dataset: the discovered dataset.
        out_dir: where ``fingerprint.json``, ``plans.json`` and ``<case>.npz`` go.

    Returns:
        The plan and the preprocessed cases.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs_key = _inputs_key(dataset.cases)
    fp_path = out_dir / "fingerprint.json"
    fingerprint = json.loads(fp_path.read_text()) if fp_path.is_file() else {}
    if fingerprint.get("inputs_key") != inputs_key or fingerprint.get("orientation") != cfg.preprocess.orientation:
        fingerprint = {**compute_fingerprint(dataset, cfg.preprocess.orientation), "inputs_key": inputs_key}
        _atomic_write_text(fp_path, json.dumps(fingerprint, indent=1))
    plan = make_plan(cfg, dataset, fingerprint)
    _atomic_write_text(out_dir / "plans.json", json.dumps(plan, indent=1))
    # The network part of the plan does not change the preprocessed voxels.
    voxel_plan = {k: v for k, v in plan.items() if k != "network"}
    plan_key = hashlib.sha256((json.dumps(voxel_plan, sort_keys=True) + inputs_key).encode()).hexdigest()
    manifest_path = out_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    chain = preprocessing(plan, with_label=True)
    result = []
    for case in tqdm(dataset.cases, desc="preprocess", unit="case", leave=False):
        target = out_dir / f"{case.case_id}.npz"
        if manifest.get(case.case_id) != plan_key or not target.is_file():
            d = chain({"image": [str(p) for p in case.images], "label": str(case.label)})
            tmp = target.with_name(target.name + ".tmp.npz")
            np.savez(tmp, image=d["image"].numpy().astype(np.float32), label=d["label"].numpy().astype(np.uint8))
            os.replace(tmp, target)
            manifest[case.case_id] = plan_key
        result.append(PreprocessedCase(case.case_id, target))
    _atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    return plan, result
