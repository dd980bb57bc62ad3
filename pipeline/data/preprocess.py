"""The preprocess stage: dataset fingerprint, preprocessing plan, cached preprocessed cases."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import PipelineConfig
from pipeline.data.dataset import Case, Dataset
from pipeline.data.files import file_sha256, write_text_atomic
from pipeline.data.fingerprint import (
    intensity_percentiles,
    label_volume_stats,
    label_voxel_counts,
    obliquity_deg,
    training_fingerprint,
)
from pipeline.data.mirroring import SAMPLE_CASES, find_mirror_pairs
from pipeline.data.planning import plan_network, plan_spacing, thinnest_sides_mm
from pipeline.errors import InputDataError
from transforms.preprocessing import load_transforms, preprocessing, spatial_transforms

logger = logging.getLogger(__name__)

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


HASH_CACHE = "content_hashes.json"


def _files_of(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


class ContentHashes:
    """SHA-256 of input files, remembered by (path, size, modification time) so unchanged files are not re-read.

    The cache only saves reading time: a file whose size or time changed is hashed
    again, and what the pipeline compares is always the content hash.

    Args:
        cache_file: where the remembered hashes are kept (JSON).
    """

    def __init__(self, cache_file: Path) -> None:
        self.cache_file = cache_file
        try:
            self.cache: dict[str, list] = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
        except (OSError, ValueError):
            self.cache = {}
        self._changed = not cache_file.is_file()

    def of_file(self, path: Path) -> str:
        """The content hash of one file.

        Args:
            path: the file.
        """
        st = path.stat()
        key = str(path.resolve())
        cached = self.cache.get(key)
        if cached and cached[0] == st.st_size and cached[1] == st.st_mtime_ns:
            return cached[2]
        digest = file_sha256(path)
        self.cache[key] = [st.st_size, st.st_mtime_ns, digest]
        self._changed = True
        return digest

    def of_case(self, case: Case) -> str:
        """The content hash of a case: its channels (a DICOM folder: all its files) and its label, in order.

        Args:
            case: the case.
        """
        h = hashlib.sha256()
        for role, path in [*(("image", p) for p in case.images), *((("label", case.label),) if case.label else ())]:
            h.update(f"{role}:".encode())
            for f in _files_of(path):
                h.update(self.of_file(f).encode())
            h.update(b";")
        return h.hexdigest()

    def save(self) -> None:
        """Write the remembered hashes (atomically), when a file was hashed since they were read."""
        if self._changed:
            write_text_atomic(self.cache_file, json.dumps(self.cache))
            self._changed = False


def dataset_hash(dataset: Dataset, case_hashes: dict[str, str]) -> str:
    """One hash for the dataset's content: every case's content, its id, and the label and channel names.

    Args:
        dataset: the discovered dataset.
        case_hashes: case id -> content hash.
    """
    meta = {"labels": {str(k): v for k, v in sorted(dataset.labels.items())},
            "modalities": {str(k): v for k, v in sorted(dataset.modalities.items())},
            "cases": sorted(case_hashes.items())}
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


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


def _case_fingerprint(case: Case, content: str, orientation: str, labels: dict[int, str], folder: Path) -> dict:
    """Spacing, shape and sampled foreground intensities of one case, cached by its content hash."""
    cache = folder / f"{case.case_id}.npz"
    key = f"{content}:{orientation}"
    if cache.is_file():
        with np.load(cache) as npz:
            if str(npz["key"]) == key and "thinnest_mm" in npz:
                return {"spacing": npz["spacing"].tolist(), "shape": npz["shape"].tolist(),
                        "obliquity": float(npz["obliquity"]), "thinnest_mm": npz["thinnest_mm"].tolist(),
                        "samples": [npz[f"samples_{c}"] for c in range(int(npz["channels"]))]}
    loader = load_transforms(with_label=True)
    reorient = spatial_transforms({"orientation": orientation, "target_spacing": None}, True)[0]
    d = reorient(loader({"image": [str(p) for p in case.images], "label": str(case.label)}))
    image, label = d["image"], d["label"]
    _check_pair(case, image, label, labels)
    mask = label[0].numpy() > 0
    # Seeded by the case's content: the same case gives the same sample whatever else is in the dataset.
    rs = np.random.RandomState(int(content[:8], 16))
    samples = []
    for c in range(image.shape[0]):
        fg = image[c].numpy()[mask]
        if fg.size > FOREGROUND_SAMPLES_PER_CASE:
            fg = rs.choice(fg, FOREGROUND_SAMPLES_PER_CASE, replace=False)
        samples.append(fg.astype(np.float64))
    spacing = [float(s) for s in image.pixdim]
    entry = {"spacing": spacing, "shape": [int(s) for s in image.shape[1:]],
             "obliquity": obliquity_deg(np.asarray(image.affine)), "samples": samples,
             "thinnest_mm": thinnest_sides_mm(label[0].numpy(), sorted(v for v in labels if v > 0), spacing)}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp.npz")
    np.savez(tmp, key=key, spacing=entry["spacing"], shape=entry["shape"], obliquity=entry["obliquity"],
             channels=len(samples), thinnest_mm=np.asarray(entry["thinnest_mm"], dtype=float),
             **{f"samples_{c}": v for c, v in enumerate(samples)})
    os.replace(tmp, cache)
    return entry


def compute_fingerprint(dataset: Dataset, orientation: str, case_hashes: dict[str, str], cache_dir: Path) -> dict[str, Any]:
    """Spacings and shapes (after reorientation) and foreground intensity statistics per channel.

    Each case's part is cached by its content hash, so a new or changed case is the only one read.

    Args:
        dataset: the discovered dataset.
        orientation: axis codes the spacings/shapes are reported in.
        case_hashes: case id -> content hash.
        cache_dir: where the per-case parts are kept.
    """
    spacings, shapes, obliquities, thinnest = [], [], [], []
    samples: list[list[np.ndarray]] = [[] for _ in dataset.modalities]
    for case in tqdm(dataset.cases, desc="fingerprint", unit="case", leave=False):
        entry = _case_fingerprint(case, case_hashes[case.case_id], orientation, dataset.labels, cache_dir)
        thinnest.append(entry["thinnest_mm"])
        spacings.append(entry["spacing"])
        shapes.append(entry["shape"])
        obliquities.append(entry["obliquity"])
        for c, values in enumerate(entry["samples"]):
            samples[c].append(values)
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
        "obliquities": obliquities,
        "median_spacing": [float(x) for x in np.median(spacings, axis=0)],
        "median_shape": [float(x) for x in np.median(shapes, axis=0)],
        "foreground_intensity": stats,
        # Per label (1, 2, ...): the median over the cases holding it of its bounding box's thinnest side.
        "structure_thinnest_mm": _median_ignoring_absent(thinnest),
    }


def _mm(spacing: list[float]) -> str:
    return "x".join(f"{s:.3g}" for s in spacing)


def _median_ignoring_absent(rows: list[list[float]]) -> list[float | None]:
    if not rows or not rows[0]:
        return []
    values = np.asarray(rows, dtype=float)
    return [float(np.nanmedian(col)) if np.isfinite(col).any() else None for col in values.T]


def make_plan(cfg: PipelineConfig, dataset: Dataset, fingerprint: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The plan: orientation, target spacing, per-channel normalisation, and the network/patch/batch plan.

    Config values override what the fingerprint suggests.

    Args:
        cfg: the pipeline configuration.
        dataset: the discovered dataset (modalities and labels).
        fingerprint: from :func:`compute_fingerprint`.
        device: the device training will run on (the patch and batch size are planned for it).
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
    memory = cfg.train.memory_budget_gb
    if memory is None and device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory / 2**30
    if cfg.preprocess.target_spacing:
        target_spacing = list(cfg.preprocess.target_spacing)
        stage: dict[str, Any] = {"name": "fullres", "why": "target_spacing set in the config"}
    else:
        # The patch that will train decides the stage: the config's when it fixes one.
        target_spacing, stage = plan_spacing(fingerprint, fingerprint["median_spacing"], cfg.model.spatial_dims,
                                             device.type, memory, cfg.train.patch_size)
    network = plan_network(fingerprint, target_spacing, cfg.model.spatial_dims, device.type, memory)
    # Values set in the config win over the planner's.
    for key, value in (("patch_size", cfg.train.patch_size), ("batch_size", cfg.train.batch_size),
                       ("features", cfg.model.features)):
        if value is not None:
            network[key] = value
    return {
        "orientation": cfg.preprocess.orientation,
        "target_spacing": target_spacing,
        "stage": stage,
        "normalization": schemes,
        "ct_stats": ct_stats,
        "modalities": {str(k): v for k, v in dataset.modalities.items()},
        "labels": {str(k): v for k, v in sorted(dataset.labels.items())},
        "network": network,
    }


@dataclass
class PreprocessResult:
    """What the preprocess stage produced.

    Args:
        plan: the preprocessing plan.
        cases: the preprocessed cases.
        data_hash: the dataset's content hash (see :func:`dataset_hash`).
        case_hashes: case id -> content hash.
        redone: ids of the cases preprocessed by this call (the others were up to date).
    """

    plan: dict[str, Any]
    cases: list[PreprocessedCase]
    data_hash: str
    case_hashes: dict[str, str]
    redone: list[str]


def preprocess_dataset(cfg: PipelineConfig, dataset: Dataset, out_dir: Path, device: torch.device) -> PreprocessResult:
    """Fingerprint, plan and preprocess every case into ``out_dir``, reusing what is up to date.

    Every input file's content is hashed. A case is preprocessed again only when its
    content or the voxel part of the plan changed: new or changed cases in the dataset
    are picked up, unchanged ones reused. Files are written under a temporary name and
    renamed, so an interrupted run leaves no partial case; a case counts as done only once
    ``manifest.json`` (written after its rename) holds its key, so a call killed between
    the two redoes it. Jobs sharing ``out_dir`` call this one at a time (the caller holds
    the work directory's preprocessing lock, see :func:`pipeline.scheduling.preprocess_lock`).

    Args:
        cfg: the pipeline configuration.
        dataset: the discovered dataset.
        out_dir: where ``fingerprint.json``, ``plans.json`` and ``<case>.npz`` go.
        device: the device training will run on (see :func:`make_plan`).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    hashes = ContentHashes(out_dir / HASH_CACHE)
    case_hashes = {case.case_id: hashes.of_case(case) for case in dataset.cases}
    hashes.save()
    data_hash = dataset_hash(dataset, case_hashes)
    fingerprint = {**compute_fingerprint(dataset, cfg.preprocess.orientation, case_hashes, out_dir / "fingerprint"),
                   "data_hash": data_hash}
    write_text_atomic(out_dir / "fingerprint.json", json.dumps(fingerprint, indent=1))
    plan = make_plan(cfg, dataset, fingerprint, device)
    stage = plan["stage"]
    if stage["name"] == "lowres":
        # Shown like the validation plan: the user should know the network sees a coarser grid than the scans.
        logger.warning("plan: lower-resolution stage at %s mm: at %s mm the %s patch would cover %.0f%% of the median "
                    "case, at this spacing %.0f%%", _mm(plan["target_spacing"]), _mm(stage["fullres_spacing"]),
                    "x".join(map(str, plan["network"]["patch_size"])), 100 * stage["fullres_coverage"],
                    100 * stage["coverage"])
    # The network part of the plan (and the stage's description of it) does not change the preprocessed voxels.
    voxel_plan = json.dumps({k: v for k, v in plan.items() if k not in ("network", "fingerprint", "stage")},
                            sort_keys=True)
    manifest_path = out_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    chain = preprocessing(plan, with_label=True)
    percentiles_path = out_dir / "intensity_percentiles.json"
    percentiles = json.loads(percentiles_path.read_text()) if percentiles_path.is_file() else {}
    result, redone = [], []
    for case in tqdm(dataset.cases, desc="preprocess", unit="case", leave=False):
        target = out_dir / f"{case.case_id}.npz"
        key = hashlib.sha256((voxel_plan + case_hashes[case.case_id]).encode()).hexdigest()
        if manifest.get(case.case_id) != key or not target.is_file():
            d = chain({"image": [str(p) for p in case.images], "label": str(case.label)})
            tmp = target.with_name(target.name + ".tmp.npz")
            label = d["label"].numpy().astype(np.uint8)
            np.savez(tmp, image=d["image"].numpy().astype(np.float32), label=label)
            os.replace(tmp, target)
            manifest[case.case_id] = key
            percentiles[case.case_id] = [key, intensity_percentiles(d["image"].numpy()), label_voxel_counts(label)]
            redone.append(case.case_id)
            # Saved per case: an interrupted call keeps what it finished.
            write_text_atomic(manifest_path, json.dumps(manifest, indent=1))
        result.append(PreprocessedCase(case.case_id, target))
    plan["mirror_pairs"] = _mirror_pairs(plan, result)
    plan["fingerprint"] = _conformity_fingerprint(dataset, fingerprint, result, manifest, percentiles,
                                                  plan["target_spacing"])
    write_text_atomic(percentiles_path, json.dumps(percentiles))
    # Written once, complete: a fold's job past preprocessing may log this file while another job preprocesses.
    write_text_atomic(out_dir / "plans.json", json.dumps(plan, indent=1))
    return PreprocessResult(plan, result, data_hash, case_hashes, redone)


def _mirror_pairs(plan: dict[str, Any], cases: list[PreprocessedCase]) -> list[dict[str, Any]]:
    """The label pairs that mirror onto each other (see :mod:`pipeline.data.mirroring`), from a sample of label maps."""
    labels = {int(k): v for k, v in plan["labels"].items()}
    if len([v for v in labels if v != 0]) < 2 or not cases:
        return []
    picked = sorted({int(i) for i in np.linspace(0, len(cases) - 1, min(SAMPLE_CASES, len(cases)))})
    maps = []
    for i in picked:
        with np.load(cases[i].path) as npz:
            maps.append(npz["label"][0])
    return find_mirror_pairs(labels, maps, plan["target_spacing"], plan["orientation"])


def _conformity_fingerprint(
    dataset: Dataset, fingerprint: dict[str, Any], cases: list[PreprocessedCase], manifest: dict[str, str],
    percentiles: dict[str, list], spacing: list[float],
) -> dict[str, Any]:
    """The training fingerprint the plan carries for the input check at prediction and the volume signal
    (see :mod:`pipeline.data.fingerprint`).

    Each case's normalised-intensity percentiles and label voxel counts are kept by its preprocessing
    key (``intensity_percentiles.json``: ``[key, percentiles, counts]``), so only new or changed cases
    are read again, and cases cached before the counts existed once.
    """
    for case in cases:
        cached = percentiles.get(case.case_id)
        if not cached or cached[0] != manifest[case.case_id] or len(cached) < 3:
            image, label = case.load()
            percentiles[case.case_id] = [manifest[case.case_id], intensity_percentiles(image.numpy()),
                                         label_voxel_counts(label.numpy())]
    return training_fingerprint(
        {str(k): v for k, v in dataset.modalities.items()}, fingerprint["spacings"], fingerprint["shapes"],
        fingerprint["obliquities"], [percentiles[c.case_id][1] for c in cases],
        label_volume_stats([percentiles[c.case_id][2] for c in cases], spacing))
