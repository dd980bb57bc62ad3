"""Mixed precision in training (``train.amp``): float16 on CUDA, bfloat16 on a CPU with native bf16, else float32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.inference import accelerate
from pipeline.training import devices
from pipeline.training.loop import build_parts

KWARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "features": [4, 8], "norm": "instance",
          "deep_supervision": True}


def test_the_precision_follows_the_device_and_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert devices.autocast_dtype(cuda, True) == torch.float16
    assert devices.autocast_dtype(cuda, False) is None
    monkeypatch.setattr(accelerate, "cpu_has_native_bf16", lambda: True)
    assert devices.autocast_dtype(cpu, True) == torch.bfloat16
    assert devices.autocast_dtype(cpu, False) is None
    monkeypatch.setattr(accelerate, "cpu_has_native_bf16", lambda: False)
    assert devices.autocast_dtype(cpu, True) is None


def test_native_bf16_needs_one_of_the_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    detect = accelerate.cpu_has_native_bf16.__wrapped__  # past the per-process cache
    monkeypatch.setattr(accelerate, "_NATIVE_BF16_FLAGS", {"no_such_cpu_flag"})
    assert detect() is False
    flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    if torch.ops.mkldnn._is_mkldnn_bf16_supported() and flags.split()[2:]:
        monkeypatch.setattr(accelerate, "_NATIVE_BF16_FLAGS", {flags.split()[2]})  # a flag this CPU has
        assert detect() is True


def _step(tiny_config: Path, bf16: bool, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(accelerate, "cpu_has_native_bf16", lambda: bf16)
    cfg = load_config(tiny_config)
    torch.manual_seed(0)
    parts = build_parts(cfg.train, KWARGS, torch.device("cpu"))
    seen: list[torch.dtype] = []
    first_conv = next(m for m in parts.network.modules() if isinstance(m, torch.nn.Conv3d))
    first_conv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    torch.manual_seed(1)
    image = torch.randn(2, 1, 16, 16, 16)
    label = (image > 0.5).long() + (image > 1.5).long()
    before = [p.detach().clone() for p in parts.network.parameters()]
    loss = parts.forward_loss(image, label)
    parts.backward(loss)
    grads = [p.grad for p in parts.network.parameters()]
    parts.step()
    moved = any(not torch.equal(b, p) for b, p in zip(before, parts.network.parameters()))
    return parts, seen, float(loss), grads, moved


def test_a_bf16_step_runs_the_convolutions_in_bf16_and_keeps_float32_weights(
    tiny_config: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    parts, seen, loss, grads, moved = _step(tiny_config, True, monkeypatch)
    assert parts.amp_dtype == torch.bfloat16 and parts.precision == "bfloat16"
    assert not parts.scaler.is_enabled()  # bf16 has float32's range: no loss scaling
    assert seen == [torch.bfloat16]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == torch.float32 for p in parts.network.parameters())
    assert moved

    _, seen32, loss32, _, _ = _step(tiny_config, False, monkeypatch)
    assert seen32 == [torch.float32]
    # Same weights and batch: bf16's 8-bit mantissa moves the loss by well under a percent, not more.
    assert loss == pytest.approx(loss32, rel=2e-2)
    assert loss != loss32


def test_amp_off_trains_in_float32_even_where_bf16_is_native(tiny_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accelerate, "cpu_has_native_bf16", lambda: True)
    cfg = load_config(tiny_config, ["train.amp=false"])
    parts = build_parts(cfg.train, KWARGS, torch.device("cpu"))
    assert parts.amp_dtype is None and parts.precision == "float32"
    seen: list[torch.dtype] = []
    next(m for m in parts.network.modules() if isinstance(m, torch.nn.Conv3d)).register_forward_hook(
        lambda _m, _i, out: seen.append(out.dtype))
    parts.forward_loss(torch.randn(1, 1, 16, 16, 16), torch.zeros(1, 1, 16, 16, 16, dtype=torch.long))
    assert seen == [torch.float32]


@pytest.mark.parametrize(("native", "expected"), [(True, "bfloat16"), (False, "float32")])
def test_a_training_run_reports_its_precision(tiny_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              native: bool, expected: str) -> None:
    from pipeline.stages import prepare
    from pipeline.training import train

    monkeypatch.setattr(accelerate, "cpu_has_native_bf16", lambda: native)
    cfg = load_config(tiny_config, ["train.epochs=1", "train.iterations_per_epoch=2"])
    prepared = prepare(cfg, tmp_path / "w")
    result = train(cfg, prepared.plan, prepared.subset("train"), prepared.subset("val"), tmp_path / "ckpt")
    assert result.precision == expected
