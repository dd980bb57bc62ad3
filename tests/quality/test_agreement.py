"""The agreement signal: pairwise Dice between the mirrored passes' own masks (and an ensemble's models' masks)."""

from __future__ import annotations

import itertools
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.inference import SlidingWindowInferer, WindowSettings
from pipeline.quality import SIGNALS, quality_signals
from pipeline.quality.agreement import MaskAgreement, mean_agreement


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def test_mean_pairwise_dice_by_hand() -> None:
    maps = [torch.zeros(4, 4, 4, dtype=torch.uint8) for _ in range(3)]
    maps[0][:2] = 1
    maps[1][:3] = 1
    maps[2][1:3] = 1
    maps[2][3, 0, 0] = 2  # label 2 in one member only: its pairs with the other two score 0, the third pair 1
    agreement = MaskAgreement()
    for m in maps:
        agreement.add(m)
    got = agreement.dice([1, 2, 3])
    pairs = list(itertools.combinations(maps, 2))
    assert got[1] == pytest.approx(np.mean([_dice(a == 1, b == 1) for a, b in pairs]))
    assert got[2] == pytest.approx(1 / 3)
    assert got[3] == 1.0  # absent from every member: agreed on, not a failure
    assert agreement.members == 3


def test_one_member_has_nothing_to_compare_and_shapes_must_match() -> None:
    agreement = MaskAgreement()
    agreement.add(torch.ones(3, 3, 3))
    assert math.isnan(agreement.dice([1])[1])
    with pytest.raises(ValueError, match="voxels"):
        agreement.add(torch.ones(2, 3, 3))
    with pytest.raises(ValueError, match="below 255"):
        agreement.add(torch.full((3, 3, 3), 255))
    agreement.reset()
    assert agreement.members == 0
    assert mean_agreement([{1: 0.5, 2: math.nan}, {1: 0.7, 2: math.nan}]) == {1: pytest.approx(0.6), 2: pytest.approx(
        math.nan, nan_ok=True)}


class _Net(torch.nn.Module):
    """Deterministic and not mirror-symmetric: the flipped passes disagree where the input varies."""

    spatial_dims = 3

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.conv = torch.nn.Conv3d(1, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * 4


def test_each_mirrored_pass_mask_is_its_own_argmax() -> None:
    net = _Net().eval()
    image = torch.randn(1, 16, 16, 16)
    engine = SlidingWindowInferer(net, [16, 16, 16], WindowSettings(overlap=0.0, mode="constant", mirror=True,
                                                                     batch_size=4, compile="off"), torch.device("cpu"))
    agreement = MaskAgreement()
    logits, spread = engine.with_spread(image, agreement=agreement)
    assert agreement.members == 8
    expected = MaskAgreement()
    with torch.no_grad():
        for r in range(4):
            for axes in itertools.combinations([1, 2, 3], r):
                out = net((torch.flip(image, axes) if axes else image)[None])[0]
                expected.add(torch.argmax(torch.flip(out, axes) if axes else out, 0))
    assert agreement.dice([1, 2]) == pytest.approx(expected.dice([1, 2]), abs=1e-6)
    assert 0.0 < agreement.dice([1])[1] < 1.0
    # Stitching the passes one at a time changes neither the prediction nor the spread.
    plain_logits, plain_spread = engine.with_spread(image)
    assert torch.allclose(logits, plain_logits, atol=1e-5) and torch.allclose(spread, plain_spread, atol=1e-4)


def test_per_pass_stitching_equals_the_shared_one_with_overlapping_and_asymmetric_tiles() -> None:
    net = _Net().eval()
    image = torch.randn(1, 23, 18, 12)  # odd spans: some flips move the tiles; 12 < 16 pads one axis
    engine = SlidingWindowInferer(net, [16, 16, 16], WindowSettings(overlap=0.5, mirror=True, batch_size=3,
                                                                     compile="off"), torch.device("cpu"))
    agreement = MaskAgreement()
    logits, _ = engine.with_spread(image, agreement=agreement)
    assert agreement.members == 8
    assert torch.allclose(logits, engine(image), atol=1e-5)
    assert all(0.0 <= d <= 1.0 for d in agreement.dice([1, 2]).values())


def test_without_mirroring_there_is_one_pass_and_no_agreement() -> None:
    engine = SlidingWindowInferer(_Net().eval(), [16, 16, 16], WindowSettings(overlap=0.0, mirror=False, compile="off"),
                                  torch.device("cpu"))
    agreement = MaskAgreement()
    engine.with_spread(torch.randn(1, 16, 16, 16), agreement=agreement)
    assert agreement.members == 1 and math.isnan(agreement.dice([1])[1])


def test_signals_carry_the_agreement_also_for_a_structure_nobody_found() -> None:
    labels = torch.zeros(10, 10, 10, dtype=torch.long)
    labels[2:6, 2:6, 2:6] = 1
    probs = torch.nn.functional.one_hot(labels, 3).permute(3, 0, 1, 2).float()
    out = quality_signals(probs, labels, None, [1, 2], agreements={"agreement": {1: 0.8, 2: 1.0}})
    assert set(out[1]) == set(out[2]) == set(SIGNALS)
    assert out[1]["agreement"] == 0.8 and out[2]["agreement"] == 1.0 and out[2]["voxels"] == 0
    assert math.isnan(out[1]["agreement_members"])


def _checkpoint(seed: int) -> dict:
    from models.unet import UNet

    torch.manual_seed(seed)
    kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "features": [4, 8], "norm": "instance",
              "deep_supervision": False}
    net = UNet(**kwargs)
    with torch.no_grad():
        net.head.bias.copy_(torch.tensor([0.0, 0.3, -0.2]))  # both foreground labels in the masks
    plan = {"orientation": "RAS", "target_spacing": [1.0, 1.0, 1.0], "normalization": ["zscore"], "ct_stats": [None],
            "modalities": {"0": "MRI"}, "labels": {"0": "bg", "1": "a", "2": "b"}}
    return {"model": kwargs, "plan": plan, "patch_size": [16, 16, 16], "state_dict": net.state_dict(),
            "inference": {"mirror": True, "overlap": 0.25, "sw_batch_size": 4, "compile": "off"}}


def test_an_ensemble_reports_its_models_agreement_beside_the_passes(tmp_path) -> None:
    from pipeline.inference import load_model_from_checkpoint
    from pipeline.inference.predictor import Predictor

    image = tmp_path / "case.nii.gz"
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.normal(size=(20, 18, 16)).astype(np.float32), np.eye(4)), image)
    cpu = torch.device("cpu")
    single = Predictor([load_model_from_checkpoint(_checkpoint(1), cpu)], cpu)
    one = single.predict_loaded(single.load([image]), quality=True).signals
    assert one is not None
    assert all(0.0 <= s["agreement"] <= 1.0 and math.isnan(s["agreement_members"]) for s in one.values())
    pair = Predictor([load_model_from_checkpoint(_checkpoint(s), cpu) for s in (1, 2)], cpu)
    two = pair.predict_loaded(pair.load([image]), quality=True).signals
    assert two is not None
    assert all(0.0 <= s["agreement_members"] <= 1.0 and 0.0 <= s["agreement"] <= 1.0 for s in two.values())
    # Two differently seeded untrained networks disagree somewhere.
    assert min(s["agreement_members"] for s in two.values()) < 1.0
