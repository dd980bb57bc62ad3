"""The signals of a structure's shape and size: ``fragments`` (pieces outside the largest one) and ``volume_z``
(its volume against the training cases'), the training volumes the plan carries for it, and models saved
before those volumes (``volume_z`` NaN, nothing else changes)."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.data import PreprocessedCase, label_volume_stats, label_voxel_counts, training_fingerprint
from pipeline.quality import SIGNALS, quality_signals
from pipeline.quality.signals import fragments


def _one_hot(labels: torch.Tensor, classes: int = 2) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, classes).permute(3, 0, 1, 2).float() * 0.98 + 0.01


def test_fragments_is_the_share_of_the_structure_outside_its_largest_piece() -> None:
    labels = torch.zeros(24, 24, 24, dtype=torch.long)
    labels[2:8, 2:8, 2:8] = 1  # 216 voxels
    one = quality_signals(_one_hot(labels), labels, None, [1])[1]
    assert one["fragments"] == 0.0
    labels[16:18, 16:18, 16:18] = 1  # a second piece of 8 voxels, apart from the first
    two = quality_signals(_one_hot(labels), labels, None, [1])[1]
    assert two["fragments"] == pytest.approx(8 / 224)
    assert two["voxels"] == 224
    # Touching at a corner is one piece (full connectivity, as the keep-largest-component postprocessing).
    labels[16:18, 16:18, 16:18] = 0
    labels[8, 8, 8] = 1
    assert quality_signals(_one_hot(labels), labels, None, [1])[1]["fragments"] == 0.0
    empty = quality_signals(_one_hot(labels), torch.zeros_like(labels), None, [1])[1]
    assert set(empty) == set(SIGNALS) and math.isnan(empty["fragments"]) and math.isnan(empty["volume_z"])
    # More pieces than the compact labelling holds: labelled again, the share still right.
    dust = np.zeros((600, 600), dtype=bool)
    dust[::2, ::2] = True  # 90,000 single pixels
    assert fragments(dust) == pytest.approx(1 - 1 / 90_000)


def test_volume_z_measures_the_volume_against_the_training_volumes() -> None:
    # Training volumes of label 1: 1, 2 and 4 mL at 2 x 1 x 1 mm (0.002 mL a voxel); label 2 in one case only.
    counts = [{"1": 500}, {"1": 1000, "2": 50}, {"1": 2000}]
    stats = label_volume_stats(counts, [2.0, 1.0, 1.0])
    assert stats["voxel_ml"] == pytest.approx(0.002)
    assert stats["labels"]["1"]["median"] == pytest.approx(math.log(2.0))
    assert stats["labels"]["1"]["scale"] == pytest.approx(1.4826 * math.log(2.0))
    assert stats["labels"]["1"]["cases"] == 3 and stats["labels"]["2"]["scale"] == 0.05  # one case: no spread, floored
    # The plan's fingerprint carries them.
    fingerprint = training_fingerprint({"0": "MRI"}, [[2.0, 1.0, 1.0]] * 3, [[8, 8, 8]] * 3, [0.0] * 3,
                                       [[[0.0] * 7]] * 3, stats)
    assert fingerprint["volumes"] == stats
    # A prediction of 4000 voxels on the same grid is 8 mL: log(8 / 2) / (1.4826 log 2) = 2 / 1.4826.
    labels = torch.zeros(20, 20, 20, dtype=torch.long)
    labels[:10, :20, :20] = 1
    signals = quality_signals(_one_hot(labels), labels, None, [1], fingerprint["volumes"])[1]
    assert signals["volume_z"] == pytest.approx(2 / 1.4826)
    labels[:, :, :] = 0
    labels[:5, :10, :20] = 1  # 1000 voxels, 2 mL: the median
    assert quality_signals(_one_hot(labels), labels, None, [1], stats)[1]["volume_z"] == pytest.approx(0.0)


def test_label_voxel_counts_count_every_nonzero_value() -> None:
    label = np.zeros((1, 30, 30, 30), dtype=np.uint8)
    label[0, :3] = 1
    label[0, 10:11, :5] = 3
    assert label_voxel_counts(label) == {"1": 2700, "3": 150}
    assert label_voxel_counts(np.zeros((4, 4), dtype=np.uint8)) == {}


def test_preprocessing_reads_the_training_volumes_of_cases_cached_before_them(tmp_path: Path) -> None:
    """The plan's fingerprint gets the volumes from the preprocessed label maps on disk, also for cases whose cached
    intensity percentiles predate the counts (read once, then cached with them)."""
    from pipeline.data.dataset import Dataset
    from pipeline.data.preprocess import _conformity_fingerprint

    cases = []
    for i, size in enumerate((4, 5, 6)):
        label = np.zeros((1, 12, 12, 12), dtype=np.uint8)
        label[0, :size, :size, :size] = 1
        path = tmp_path / f"c{i}.npz"
        np.savez(path, image=np.random.RandomState(i).randn(1, 12, 12, 12).astype(np.float32), label=label)
        cases.append(PreprocessedCase(f"c{i}", path))
    manifest = {c.case_id: "key" for c in cases}
    percentiles = {c.case_id: ["key", [[0.0] * 7]] for c in cases}  # as cached before the volumes existed
    dataset = Dataset(root=tmp_path, name="t", modalities={0: "MRI"}, labels={0: "bg", 1: "a"}, cases=[])
    raw = {"spacings": [[1.0, 1.0, 1.0]] * 3, "shapes": [[12, 12, 12]] * 3, "obliquities": [0.0] * 3}
    fingerprint = _conformity_fingerprint(dataset, raw, cases, manifest, percentiles, [1.0, 1.0, 2.0])
    volumes = fingerprint["volumes"]
    assert volumes["voxel_ml"] == pytest.approx(0.002)
    assert volumes["labels"]["1"]["median"] == pytest.approx(math.log(125 * 0.002))
    assert percentiles["c0"][2] == {"1": 64}  # cached for the next call


def _model(tmp_path: Path, fingerprint: dict | None):
    """A seeded, untrained tiny U-Net whose head favours label 1, with a plan that has ``fingerprint`` (or none)."""
    from models.unet import UNet
    from pipeline.inference import load_model
    from pipeline.inference.checkpoints import save_checkpoint

    torch.manual_seed(7)
    kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "features": [4, 8], "norm": "instance",
              "deep_supervision": False}
    net = UNet(**kwargs)
    with torch.no_grad():
        net.head.bias.copy_(torch.tensor([0.0, 0.2]))
    plan = {"orientation": "RAS", "target_spacing": [1.0, 1.0, 1.0], "normalization": ["zscore"], "ct_stats": [None],
            "modalities": {"0": "MRI"}, "labels": {"0": "background", "1": "a"}}
    if fingerprint is not None:
        plan["fingerprint"] = fingerprint
    path = tmp_path / f"model_{fingerprint is not None}.pt"
    save_checkpoint({"model": kwargs, "plan": plan, "patch_size": [16, 16, 16], "state_dict": net.state_dict(),
                     "inference": {"mirror": False, "overlap": 0.25}}, path)
    return load_model(path, torch.device("cpu"))


def test_a_model_saved_before_the_training_volumes_predicts_with_volume_z_nan(tmp_path: Path) -> None:
    from pipeline.inference import Predictor

    image = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.random.RandomState(0).randn(20, 20, 20).astype(np.float32), np.eye(4)), str(image))
    results = {}
    volumes = label_volume_stats([{"1": 2000}, {"1": 4000}, {"1": 8000}], [1.0, 1.0, 1.0])
    old_fingerprint = training_fingerprint({"0": "MRI"}, [[1.0] * 3] * 3, [[20] * 3] * 3, [0.0] * 3, [[[0.0] * 7]] * 3)
    for name, fingerprint in (("none", None), ("old", old_fingerprint), ("new", {**old_fingerprint, "volumes": volumes})):
        predictor = Predictor([_model(tmp_path, fingerprint)], torch.device("cpu"))
        result = predictor.predict_loaded(predictor.load([image]), quality=True)
        assert result.signals is not None
        results[name] = result.signals[1]
    assert results["none"]["voxels"] > 0
    for name in ("none", "old"):
        assert math.isnan(results[name]["volume_z"])
        assert {k: v for k, v in results[name].items() if k != "volume_z"} == pytest.approx(
            {k: v for k, v in results["new"].items() if k != "volume_z"}, nan_ok=True)  # no mirroring: no agreement
    expected = abs(math.log(results["new"]["voxels"] * 0.001) - math.log(4.0)) / (1.4826 * math.log(2.0))
    assert results["new"]["volume_z"] == pytest.approx(expected)


def test_the_plan_fingerprint_carries_the_volumes_of_the_preprocessed_training_labels(tmp_path: Path) -> None:
    """Real preprocessing of 4 synthetic cases: the volumes are the saved label maps' counts on the plan's grid."""
    import yaml

    from pipeline.config import load_config
    from pipeline.data import load_dataset, make_demo_dataset, preprocess_dataset
    from tests.conftest import TINY

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**TINY, "data": {"synthetic_cases": 4, "synthetic_size": [28, 28, 28]}}))
    dataset = load_dataset(make_demo_dataset(tmp_path / "data", 4, [28, 28, 28]))
    result = preprocess_dataset(load_config(config, []), dataset, tmp_path / "pre", torch.device("cpu"))
    counts = []
    for case in result.cases:
        _, label = case.load()
        counts.append({str(v): int((label == v).sum()) for v in (1, 2)})
    volumes = result.plan["fingerprint"]["volumes"]
    assert volumes == label_volume_stats(counts, result.plan["target_spacing"])
    assert set(volumes["labels"]) == {"1", "2"} and volumes["voxel_ml"] == pytest.approx(
        float(np.prod(result.plan["target_spacing"])) / 1000)
