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


def test_the_loss_is_computed_in_float32_when_the_network_runs_in_bf16(
    tiny_config: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(accelerate, "cpu_has_native_bf16", lambda: True)
    parts = build_parts(load_config(tiny_config).train, KWARGS, torch.device("cpu"))
    seen: list[torch.dtype] = []
    parts.loss_fn.loss.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    loss = parts.forward_loss(torch.randn(2, 1, 16, 16, 16), torch.zeros(2, 1, 16, 16, 16, dtype=torch.long))
    assert parts.amp_dtype == torch.bfloat16
    assert seen and set(seen) == {torch.float32}  # every deep-supervision level's logits
    assert loss.dtype == torch.float32


def test_a_step_with_non_finite_gradients_is_skipped_and_changes_nothing(
    tiny_config: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(accelerate, "cpu_has_native_bf16", lambda: True)
    parts = build_parts(load_config(tiny_config).train, KWARGS, torch.device("cpu"))
    image = torch.randn(2, 1, 16, 16, 16)
    label = (image > 0.5).long()
    parts.backward(parts.forward_loss(image, label))
    assert parts.step()  # a good step first, so the optimiser has state to spoil
    weights = [p.detach().clone() for p in parts.network.parameters()]
    state = {k: v.clone() for k, v in parts.optimizer.state_dict()["state"][0].items()}
    parts.backward(parts.forward_loss(image, label))
    next(parts.network.parameters()).grad[0] = float("nan")  # as the bf16 kernels left it
    assert parts.step() is False
    assert parts.nonfinite_grads == [next(iter(parts.network.named_parameters()))[0]]  # named before dropped
    assert all(torch.equal(w, p) for w, p in zip(weights, parts.network.parameters()))
    assert all(torch.equal(v, parts.optimizer.state_dict()["state"][0][k]) for k, v in state.items())
    assert all(p.grad is None for p in parts.network.parameters())


def _inject_nan_losses(monkeypatch: pytest.MonkeyPatch, bad_calls: set[int]) -> list[torch.dtype | None]:
    """Make ``forward_loss`` return NaN on the given calls (1-based); returns each call's autocast type."""
    from pipeline.training.parts import TrainParts

    real, calls, precisions = TrainParts.forward_loss, [0], []

    def forward_loss(self: TrainParts, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        precisions.append(self.amp_dtype)
        loss = real(self, image, label)
        return loss * float("nan") if calls[0] in bad_calls else loss

    monkeypatch.setattr(TrainParts, "forward_loss", forward_loss)
    return precisions


def test_non_finite_bf16_steps_are_skipped_then_the_run_goes_on_in_float32_and_resumes_so(
    tiny_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    from pipeline.inference import load_checkpoint
    from pipeline.stages import prepare
    from pipeline.training import train

    monkeypatch.setattr(accelerate, "cpu_has_native_bf16", lambda: True)
    precisions = _inject_nan_losses(monkeypatch, {2, 3, 5})
    cfg = load_config(tiny_config, ["train.epochs=2", "train.iterations_per_epoch=4"])
    prepared = prepare(cfg, tmp_path / "w")
    with caplog.at_level("WARNING", logger="pipeline.training.loop"):
        result = train(cfg, prepared.plan, prepared.subset("train"), prepared.subset("val"), tmp_path / "ckpt")
    assert result.epochs == 2 and result.skipped_steps == 3 and result.fell_back_to_float32
    assert result.precision == "float32"
    # bf16 until the third non-finite step (call 5), float32 from the next one on.
    assert precisions == [torch.bfloat16] * 5 + [None] * 3
    warnings = [r.getMessage() for r in caplog.records if "float32" in r.getMessage()]
    assert len(warnings) == 1 and "non-finite" in warnings[0]
    weights = load_checkpoint(result.last_checkpoint)
    assert weights["fell_back_to_float32"] is True and weights["skipped_steps"] == 3
    assert all(torch.isfinite(v).all() for v in weights["state_dict"].values() if v.is_floating_point())

    precisions.clear()
    more = load_config(tiny_config, ["train.epochs=3", "train.iterations_per_epoch=4"])
    resumed = train(more, prepared.plan, prepared.subset("train"), prepared.subset("val"), tmp_path / "ckpt",
                    resume=True)
    assert resumed.epochs == 3 and resumed.precision == "float32" and resumed.skipped_steps == 3
    assert precisions == [None] * 4  # the resumed epoch trains as the run ended: in float32


def test_float32_steps_that_stay_non_finite_end_the_run_as_diverged(
    tiny_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pipeline.errors import TrainingFailedError
    from pipeline.stages import prepare
    from pipeline.training import train

    monkeypatch.setattr(accelerate, "cpu_has_native_bf16", lambda: False)
    _inject_nan_losses(monkeypatch, {2} | set(range(4, 100)))
    cfg = load_config(tiny_config, ["train.epochs=3", "train.iterations_per_epoch=4"])
    prepared = prepare(cfg, tmp_path / "w")
    with pytest.raises(TrainingFailedError, match=r"diverged at epoch 2, iteration 4: .* non-finite for 5 steps"):
        train(cfg, prepared.plan, prepared.subset("train"), prepared.subset("val"), tmp_path / "ckpt")


def test_the_non_finite_count_falls_back_after_three_reduced_steps_and_fails_after_five_in_a_row() -> None:
    from pipeline.training.nonfinite import NonFiniteSteps

    guard = NonFiniteSteps()
    assert [guard.record(f, True) for f in (False, True, False)] == ["skip", "ok", "skip"]
    assert guard.record(False, True) == "fall_back" and guard.fell_back and guard.skipped == 3
    assert [guard.record(False, False) for _ in range(4)] == ["skip"] * 4
    assert guard.record(True, False) == "ok"  # a good step resets the run of failures
    assert [guard.record(False, False) for _ in range(5)] == ["skip"] * 4 + ["fail"]
