"""The network's arithmetic on a CPU (``evaluate.precision``): bfloat16 autocast where the CPU has it natively."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from models.unet import UNet
from pipeline.cli import build_parser
from pipeline.config import ConfigError, load_config
from pipeline.inference import InferenceSettings, accelerate, aot
from pipeline.inference.sliding_window import SlidingWindowInferer, WindowSettings
from tests.conftest import TINY

CPU = torch.device("cpu")
SHAPE = (2, 1, 16, 16, 16)


def _net(seed: int = 3) -> UNet:
    torch.manual_seed(seed)
    return UNet(spatial_dims=3, in_channels=1, out_channels=3, features=[4, 8], norm="instance").eval()


def _run(net: UNet, precision: str, image: torch.Tensor, compile: str = "off") -> tuple[torch.Tensor, list, str]:
    """Logits of ``image``, the dtypes the first convolution computed in, and what the engine reports it ran in."""
    seen: list[torch.dtype] = []
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv3d))
    hook = conv.register_forward_hook(lambda _m, _i, output: seen.append(output.dtype))
    try:
        engine = SlidingWindowInferer(net, [16, 16, 16], WindowSettings(batch_size=2, compile=compile,  # type: ignore[arg-type]
                                                                        precision=precision), CPU)
        out = engine(image)
    finally:
        hook.remove()
    return out, seen, engine.precision


def test_bfloat16_runs_the_network_in_bf16_and_stays_close_to_float32() -> None:
    net, image = _net(), torch.randn(1, 24, 20, 18, generator=torch.Generator().manual_seed(1))
    full, seen32, ran32 = _run(net, "float32", image)
    half, seen16, ran16 = _run(net, "bfloat16", image)
    assert set(seen32) == {torch.float32} and ran32 == "float32"
    assert set(seen16) == {torch.bfloat16} and ran16 == "bfloat16"
    assert full.dtype == half.dtype == torch.float32  # blending and stitching stay float32
    p32, p16 = torch.softmax(full, 0), torch.softmax(half, 0)
    assert float((p32 - p16).abs().max()) > 1e-5, "bf16 computed exactly what float32 did: autocast did nothing"
    assert float((p32 - p16).abs().max()) < aot.TOLERANCE_BF16
    assert float((p32.argmax(0) == p16.argmax(0)).float().mean()) > 0.99


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_only_on_a_cpu_with_native_bf16(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accelerate, "cpu_has_native_bf16", lambda: native)
    _, seen, ran = _run(_net(), "auto", torch.randn(1, 20, 20, 20))
    expected = torch.bfloat16 if native else torch.float32
    assert set(seen) == {expected} and ran == str(expected).removeprefix("torch.")


def test_a_bf16_package_has_its_own_key_and_agrees_with_bf16_eager(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNET_PIPELINE_CACHE", str(tmp_path))
    monkeypatch.setattr(aot, "_LOADED", {})
    net = _net(6)
    key16 = aot.key_for(net, SHAPE, "cpu", "bfloat16")
    assert key16.digest() != aot.key_for(net, SHAPE, "cpu").digest()
    fast = accelerate.compiled(net, SHAPE, "bfloat16")
    if fast is None:
        pytest.skip("AOTInductor cannot compile on this platform (no C++ compiler?)")
    # The bf16 package itself answers below, not torch.compile's fallback nor the eager network.
    assert isinstance(fast, aot._Runner) and aot.package_path(key16).is_file()
    assert aot.load(aot.key_for(net, SHAPE, "cpu")) is None  # a float32 job does not take the bf16 package
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        compiled, eager16, eager32 = fast(x), aot.runnable(net, "bfloat16")(x), net(x)
    assert compiled.dtype == torch.float32
    assert float((torch.softmax(compiled, 1) - torch.softmax(eager16, 1)).abs().max()) < aot.TOLERANCE_BF16
    assert float((compiled - eager32).abs().max()) > 1e-5  # it is not the float32 network
    # The engine asked for bf16 finds that package, even for one small volume.
    calls = []
    monkeypatch.setattr(aot, "_LOADED", {str(aot.package_path(key16)): lambda t: calls.append(t.shape) or fast(t)})
    _run(net, "bfloat16", torch.randn(1, 24, 20, 18), compile="auto")
    assert calls and set(calls) == {SHAPE}


def test_new_models_store_auto_older_ones_keep_float32_and_the_cli_overrides(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(TINY))
    settings = InferenceSettings.from_config(load_config(config))
    assert settings.precision == "auto" and settings.to_dict()["precision"] == "auto"
    assert InferenceSettings.from_dict(settings.to_dict()).precision == "auto"
    older = {k: v for k, v in settings.to_dict().items() if k != "precision"}
    assert InferenceSettings.from_dict(older).precision == "float32"  # what it was validated with
    assert settings.window().precision == "auto"
    from pipeline.cli import _overrides

    args = build_parser().parse_args(["predict", "--model", "m.pt", "--precision", "float32", "--out", "o", "x.nii.gz"])
    assert _overrides(args).apply(settings).precision == "float32"
    args = build_parser().parse_args(["predict", "--model", "m.pt", "--out", "o", "x.nii.gz"])
    assert _overrides(args).apply(settings).precision == "auto"


def test_an_unknown_precision_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**TINY, "evaluate": {**TINY["evaluate"], "precision": "fp8"}}))
    with pytest.raises(ConfigError, match=r"evaluate\.precision"):
        load_config(config)
