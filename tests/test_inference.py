"""Sliding-window inference: stitching covers the volume; mirroring averages the flipped predictions."""

from __future__ import annotations

import itertools

import pytest
import torch

from models.unet import UNet
from pipeline.config import EvaluateConfig
from pipeline.inference import predict_logits


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_mirroring_is_the_mean_over_all_flips(spatial_dims: int) -> None:
    torch.manual_seed(0)
    model = UNet(spatial_dims, 1, 3, (4, 8)).eval()
    image = torch.randn(1, 20, 18, 6)
    patch = [16, 16] if spatial_dims == 2 else [16, 16, 4]
    plain = EvaluateConfig(overlap=0.5, mirror=False)
    mirrored = predict_logits(model, image, patch, EvaluateConfig(overlap=0.5, mirror=True), torch.device("cpu"))
    axes = [1, 2] if spatial_dims == 2 else [1, 2, 3]
    expected = torch.zeros_like(mirrored)
    combos = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]
    for dims in combos:
        flipped = torch.flip(image, dims) if dims else image
        out = predict_logits(model, flipped, patch, plain, torch.device("cpu"))
        expected += torch.flip(out, dims) if dims else out
    expected /= len(combos)
    torch.testing.assert_close(mirrored, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(mirrored, predict_logits(model, image, patch, plain, torch.device("cpu")))


def test_stitched_output_covers_a_volume_larger_than_the_window() -> None:
    model = UNet(3, 2, 4, (4, 8)).eval()
    out = predict_logits(model, torch.randn(2, 37, 29, 23), [16, 16, 16], EvaluateConfig(overlap=0.25),
                         torch.device("cpu"))
    assert out.shape == (4, 37, 29, 23) and torch.isfinite(out).all()
