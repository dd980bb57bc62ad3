"""Our sliding-window engine against MONAI's ``sliding_window_inference`` and a plain reference loop."""

from __future__ import annotations

import itertools
import logging
from dataclasses import replace

import pytest
import torch
from monai.inferers import sliding_window_inference

from models.unet import UNet
from pipeline.inference.sliding_window import SlidingWindowInferer, WindowSettings, importance_map, tile_starts

CPU = torch.device("cpu")


def _settings(**kwargs: object) -> WindowSettings:
    """Eager (never compiled) unless a test asks: compiling depends on the process's history."""
    return WindowSettings(**{"compile": "off", **kwargs})


def _net(spatial_dims: int, in_channels: int = 1, out_channels: int = 3, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    net = UNet(spatial_dims, in_channels, out_channels, (4, 8)).eval()
    # Random, non-trivial weights: instance norm would otherwise hide biases.
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net


def _monai(net: UNet, image: torch.Tensor, window: list[int], overlap: float, mode: str = "gaussian",
           flips: tuple = ((),)) -> torch.Tensor:
    """MONAI's call (averaged over flipped volumes for mirroring), the way a MONAI user writes it."""
    spatial_dims = net.spatial_dims

    def run(x: torch.Tensor) -> torch.Tensor:
        return net(x[..., 0])[..., None] if spatial_dims == 2 else net(x)

    total = None
    with torch.no_grad():
        for dims in flips:
            x = image[None]
            axes = [d + 2 for d in dims]
            x = torch.flip(x, axes) if axes else x
            out = sliding_window_inference(x, window, 4, run, overlap=overlap, mode=mode)
            out = torch.flip(out, axes) if axes else out
            total = out if total is None else total + out
    return (total / len(flips))[0]


CASES = [
    # (spatial dims, image shape (C, X, Y, Z), patch)
    (3, (1, 37, 29, 23), [16, 16, 16]),   # sizes not divisible by the window
    (3, (2, 40, 24, 16), [16, 16, 16]),   # divisible, two channels
    (3, (1, 12, 30, 9), [16, 16, 16]),    # smaller than the window along two axes
    (3, (1, 10, 11, 12), [16, 16, 16]),   # smaller along every axis
    (2, (1, 37, 29, 5), [16, 16]),        # 2D network over a stack of slices
    (2, (1, 12, 40, 3), [16, 16]),        # 2D, smaller than the window in-plane
]


@pytest.mark.parametrize(("spatial_dims", "shape", "patch"), CASES)
@pytest.mark.parametrize("overlap", [0.5, 0.25])
def test_matches_monai_sliding_window_inference(spatial_dims: int, shape: tuple, patch: list, overlap: float) -> None:
    net = _net(spatial_dims, in_channels=shape[0])
    image = torch.randn(shape)
    window = [*patch, 1] if spatial_dims == 2 else patch
    ours = SlidingWindowInferer(net, patch, _settings(overlap=overlap, mirror=False, placement="monai"), CPU)(image)
    reference = _monai(net, image, window, overlap)
    assert ours.shape == reference.shape == (3, *shape[1:])
    assert ours.dtype == torch.float32
    assert (ours - reference).abs().max().item() < 1e-4


@pytest.mark.parametrize(("spatial_dims", "shape", "patch"), [CASES[0], CASES[2], CASES[4]])
def test_mirroring_matches_monai_on_every_flipped_volume(spatial_dims: int, shape: tuple, patch: list) -> None:
    net = _net(spatial_dims, in_channels=shape[0], seed=1)
    image = torch.randn(shape)
    axes = range(2) if spatial_dims == 2 else range(3)
    flips = tuple(c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r))
    window = [*patch, 1] if spatial_dims == 2 else patch
    reference = _monai(net, image, window, 0.5, flips=flips)
    for placement in ("monai", "nnunet"):
        inferer = SlidingWindowInferer(net, patch, _settings(overlap=0.5, mirror=True, placement=placement), CPU)
        ours = inferer(image)
        if placement == "monai":
            # MONAI's tiles are not symmetric here: flipped volumes see other tiles, and we follow them.
            assert (ours - reference).abs().max().item() < 1e-4
        plain = SlidingWindowInferer(net, patch, _settings(overlap=0.5, mirror=False, placement=placement), CPU)
        assert inferer.windows_evaluated >= len(flips) * _count(plain, image)


def _count(inferer: SlidingWindowInferer, image: torch.Tensor) -> int:
    inferer(image)
    return inferer.windows_evaluated


def _reference_loop(net: UNet, image: torch.Tensor, patch: list[int], overlap: float) -> torch.Tensor:
    """A plain loop over nnU-Net's tile placement with MONAI's Gaussian: sum(w * y) / sum(w)."""
    size = image.shape[1:]
    starts = [tile_starts(n, w, overlap, "nnunet") for n, w in zip(size, patch)]
    g = importance_map(tuple(patch), "gaussian", 0.125, "cpu", torch.float32)
    num = torch.zeros((3, *size))
    den = torch.zeros(size)
    with torch.no_grad():
        for pos in itertools.product(*starts):
            sl = tuple(slice(p, p + w) for p, w in zip(pos, patch))
            num[(slice(None), *sl)] += net(image[(slice(None), *sl)][None])[0] * g
            den[sl] += g
    return num / den


def test_nnunet_placement_matches_a_plain_reference_loop() -> None:
    net = _net(3)
    image = torch.randn(1, 45, 33, 20)
    ours = SlidingWindowInferer(net, [16, 16, 16], _settings(overlap=0.5, mirror=False), CPU)(image)
    assert (ours - _reference_loop(net, image, [16, 16, 16], 0.5)).abs().max().item() < 1e-4


def test_nnunet_tiles_are_spread_evenly_and_mirror_symmetric() -> None:
    # 100 voxels, window 64, step 32: nnU-Net places 0, 18, 36; MONAI 0, 32, 36.
    assert tile_starts(100, 64, 0.5, "nnunet") == [0, 18, 36]
    assert tile_starts(100, 64, 0.5, "monai") == [0, 32, 36]
    assert tile_starts(128, 64, 0.5, "nnunet") == tile_starts(128, 64, 0.5, "monai") == [0, 32, 64]
    assert tile_starts(64, 64, 0.5) == [0]
    assert tile_starts(7, 1, 0.5) == list(range(7))  # a 2D network's one-slice window: each slice once
    for size in range(16, 90):
        starts = tile_starts(size, 16, 0.5)
        assert starts[0] == 0 and starts[-1] == size - 16
        assert max(b - a for a, b in zip(starts, starts[1:] or [16])) <= 8 or len(starts) == 1
        if len(starts) % 2 == 0 or (size - 16) % 2 == 0:
            assert sorted(size - 16 - s for s in starts) == starts


def test_mirroring_with_symmetric_tiles_equals_the_mean_over_flipped_volumes() -> None:
    net = _net(3, seed=2)
    image = torch.randn(1, 40, 28, 24)
    ours = SlidingWindowInferer(net, [16, 16, 16], _settings(mirror=True), CPU)(image)
    flips = [c for r in range(4) for c in itertools.combinations(range(3), r)]
    plain = SlidingWindowInferer(net, [16, 16, 16], _settings(mirror=False), CPU)
    expected = sum(torch.flip(plain(torch.flip(image, [d + 1 for d in f])), [d + 1 for d in f]) for f in flips) / 8
    assert (ours - expected).abs().max().item() < 1e-4
    assert not torch.allclose(ours, plain(image), atol=1e-3)


def test_importance_map_equals_monais() -> None:
    from monai.data.utils import compute_importance_map

    for window in [(16, 16, 16), (32, 48, 32), (15, 20, 1)]:
        ours = importance_map(window, "gaussian", 0.125, "cpu", torch.float32)
        torch.testing.assert_close(ours, compute_importance_map(window, mode="gaussian", sigma_scale=0.125), rtol=0, atol=1e-7)
    assert importance_map((16, 16, 16), "gaussian", 0.125, "cpu", torch.float32) is importance_map(
        (16, 16, 16), "gaussian", 0.125, "cpu", torch.float32)  # cached, not rebuilt per call


def test_memory_cap_falls_back_and_gives_the_same_result(caplog: pytest.LogCaptureFixture) -> None:
    net = _net(3, seed=3)
    image = torch.randn(1, 96, 96, 64)
    settings = _settings(batch_size=8, mirror=False)
    normal = SlidingWindowInferer(net, [16, 16, 16], settings, CPU)
    expected = normal(image)
    assert normal.path.startswith("windows and stitching on cpu, ")
    # Input 2.4 MB + one batch ~2.4 MB fit in 6 MB; the stitched logits and weights (9.4 MB) do not.
    capped = SlidingWindowInferer(net, [16, 16, 16], replace(settings, memory_cap_gb=6 / 1024), CPU)
    with caplog.at_level(logging.WARNING, logger="pipeline.inference.sliding_window"):
        result = capped(image)
    assert capped.path == "fallback: windows on cpu, stitching in host memory, 8 window(s) per batch"
    assert any("out of memory" in r.message and "stitched logits" in r.message for r in caplog.records)
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-5)
    # A cap that even one batch of 8 windows cannot meet: smaller batches, the same result.
    tight = SlidingWindowInferer(net, [16, 16, 16], replace(settings, memory_cap_gb=3.2 / 1024), CPU)
    torch.testing.assert_close(tight(image), expected, rtol=0, atol=1e-5)
    assert tight.path == "fallback: windows on cpu, stitching in host memory, 2 window(s) per batch"
    # No cap can be met at all: one clear error, not a traceback.
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="out of memory"):
        SlidingWindowInferer(net, [16, 16, 16], replace(settings, memory_cap_gb=1 / 1024), CPU)(image)


def test_compiled_network_gives_the_eager_result(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.inference import accelerate

    # A compile that fails falls back to the eager network (rightly, for a user): count the batches the compiled
    # copy really answered, or this would compare eager with eager.
    answered: list[tuple[int, ...]] = []
    real = accelerate.compiled

    def counted(*args: object, **kwargs: object) -> object:
        fast = real(*args, **kwargs)
        if fast is None:
            return None

        def run(x: torch.Tensor) -> torch.Tensor:
            out = fast(x)
            answered.append(tuple(x.shape))
            return out
        return run

    monkeypatch.setattr(accelerate, "compiled", counted)
    net = _net(3, seed=5)
    image = torch.randn(1, 40, 36, 20)
    eager = SlidingWindowInferer(net, [16, 16, 16], _settings(batch_size=3), CPU)(image)
    engine = SlidingWindowInferer(net, [16, 16, 16], _settings(batch_size=3, compile="on"), CPU)
    out = engine(image)
    # Full batches of 3 always (a smaller last one would recompile); no batch fell back (that is recorded).
    assert len(answered) >= -(-engine.windows_evaluated // 3) > 1, "the compiled network did not run"
    assert set(answered) == {(3, 1, 16, 16, 16)} and str(type(net)) not in accelerate._COMPILE_FAILED
    torch.testing.assert_close(out, eager, rtol=0, atol=1e-4)


def test_compile_decision_follows_the_job_and_sticks() -> None:
    from pipeline.inference.accelerate import compiled, should_compile

    net = _net(3, seed=6)
    assert not should_compile(net, 64, "auto", volumes_left=1)  # one small volume: not worth a compile
    assert should_compile(net, 64, "auto", volumes_left=20)  # a batch of 20 such volumes is
    assert compiled(net, (4, 1, 16, 16, 16)) is not None
    # Once compiled, the batch keeps the compiled copy to its last volume.
    assert should_compile(net, 64, "auto", volumes_left=1)
    assert not should_compile(net, 64, "off", volumes_left=100)
    assert should_compile(_net(3, seed=7), 8, "on", volumes_left=1)
