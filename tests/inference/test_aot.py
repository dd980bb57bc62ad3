"""Networks compiled ahead of time: built once, loaded by later jobs, rebuilt or bypassed when they cannot be trusted."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from models.unet import UNet
from pipeline.inference import aot
from pipeline.inference.sliding_window import SlidingWindowInferer, WindowSettings

CPU = torch.device("cpu")
SHAPE = (2, 1, 16, 16, 16)


def _net(seed: int) -> UNet:
    torch.manual_seed(seed)
    return UNet(spatial_dims=3, in_channels=1, out_channels=3, features=[4, 8], norm="instance").eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One network compiled once for the module (a build takes seconds), in a cache folder of its own."""
    cache = tmp_path_factory.mktemp("aot-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNET_PIPELINE_CACHE", str(cache))
        net = _net(3)
        key = aot.key_for(net, SHAPE, "cpu")
        runner = aot.build(net, key)
    if runner is None:
        pytest.skip("AOTInductor cannot compile on this platform (no C++ compiler?)")
    return {"cache": cache, "net": net, "key": key}


@pytest.fixture
def cache(built: dict, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("UNET_PIPELINE_CACHE", str(built["cache"]))
    monkeypatch.setattr(aot, "_LOADED", {})  # as a new process: nothing loaded yet
    return built["cache"]


def test_a_later_process_loads_the_package_and_it_equals_eager(built: dict, cache: Path) -> None:
    path = aot.package_path(built["key"])
    assert path.is_file() and path.parent == cache / "compiled"
    runner = aot.load(built["key"])
    assert isinstance(runner, aot._Runner)  # the package, not the network it was built from
    x = torch.randn(SHAPE)
    with torch.inference_mode():
        torch.testing.assert_close(runner(x), built["net"](x), rtol=0, atol=1e-4)


def test_other_weights_torch_device_or_shape_find_no_package(built: dict, cache: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    net = built["net"]
    assert aot.load(aot.key_for(_net(4), SHAPE, "cpu")) is None
    assert aot.load(aot.key_for(net, (3, *SHAPE[1:]), "cpu")) is None
    assert aot.load(aot.key_for(net, SHAPE, "cuda")) is None
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert aot.load(aot.key_for(net, SHAPE, "cpu")) is None


def test_a_package_whose_key_does_not_match_is_rebuilt_not_trusted(built: dict, cache: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    # Another torch wrote a package under this file name (faked: the sidecar names its version).
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    net = _net(5)
    key = aot.key_for(net, SHAPE, "cpu")
    path = aot.package_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(aot.package_path(built["key"]).read_bytes())  # a valid package, of another network
    stored = json.loads(json.dumps(aot.asdict(key)))
    path.with_suffix(".json").write_text(json.dumps({**stored, "torch_version": "9.9.9"}))
    with caplog.at_level(logging.WARNING, logger="pipeline.inference.aot"):
        assert aot.load(key) is None
    assert [r.message for r in caplog.records if "rebuilt" in r.message]
    from pipeline.inference import accelerate

    fast = accelerate.compiled(net, SHAPE)
    # A package rebuilt now (not torch.compile's fallback, nor the eager network): the comparison below means it.
    assert isinstance(fast, aot._Runner) and json.loads(path.with_suffix(".json").read_text()) == stored
    x = torch.randn(SHAPE)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), net(x), rtol=0, atol=1e-4)


def test_a_corrupt_package_falls_back_with_one_line(built: dict, cache: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    copy = tmp_path / "cache"
    (copy / "compiled").mkdir(parents=True)
    path = aot.package_path(built["key"])
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = b"\0" * 4096
    (copy / "compiled" / path.name).write_bytes(bytes(data[: len(data) // 2]))
    (copy / "compiled" / path.with_suffix(".json").name).write_text(path.with_suffix(".json").read_text())
    os.environ["UNET_PIPELINE_CACHE"] = str(copy)  # restored by the fixture's monkeypatch
    image = torch.randn(1, 24, 20, 18)
    settings = WindowSettings(batch_size=SHAPE[0], compile="auto", mirror=False)
    with caplog.at_level(logging.WARNING):
        out = SlidingWindowInferer(built["net"], [16, 16, 16], settings, CPU)(image)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "does not load" in warnings[0].message and "\n" not in warnings[0].message
    eager = SlidingWindowInferer(built["net"], [16, 16, 16], WindowSettings(batch_size=2, compile="off",
                                                                           mirror=False), CPU)(image)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)


def test_one_small_volume_uses_a_package_built_earlier(built: dict, cache: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = aot.load(built["key"])
    assert real is not None

    def counting(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return real(x)

    monkeypatch.setitem(aot._LOADED, str(aot.package_path(built["key"])), counting)
    image = torch.randn(1, 24, 20, 18)
    settings = WindowSettings(batch_size=SHAPE[0], compile="auto", mirror=False)
    engine = SlidingWindowInferer(built["net"], [16, 16, 16], settings, CPU)
    out = engine(image)
    assert calls and set(calls) == {SHAPE}  # the job alone (8 windows) would never have paid for a compile
    eager = SlidingWindowInferer(built["net"], [16, 16, 16], WindowSettings(batch_size=2, compile="off",
                                                                           mirror=False), CPU)(image)
    torch.testing.assert_close(out, eager, rtol=0, atol=1e-4)


def test_registration_compiles_what_predict_will_look_for(cache: Path, tiny_checkpoint: Path) -> None:
    from pipeline.inference import Predictor, compile_ahead_of_time, load_model

    # A package nobody used for long, bigger than the room the cap leaves: the build evicts it, and nothing else.
    earlier = {path for path, _, _ in aot.packages()}
    stale = cache / "compiled" / f"{'0' * 32}{aot.SUFFIX}"
    stale.write_bytes(b"\0" * 40_000_000)
    stale.with_suffix(".json").write_text("{}")
    os.utime(stale, (1000, 1000))
    cap_gb = (sum(size for path, size, _ in aot.packages() if path != stale) + 30_000_000) / aot.GB
    assert compile_ahead_of_time(tiny_checkpoint, cache_max_gb=cap_gb)
    model = load_model(tiny_checkpoint, CPU)
    engine = Predictor([model], CPU).engines[0]
    shape = (engine.settings.batch_size, 1, *engine.window)
    built_now = aot.package_path(aot.key_for(model.network, shape, "cpu"))
    assert built_now.is_file()
    assert not stale.exists() and not stale.with_suffix(".json").exists()
    assert {path for path, _, _ in aot.packages()} == earlier | {built_now}


def test_the_compiled_cache_keeps_to_its_cap_the_package_used_longest_ago_first(
        built: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNET_PIPELINE_CACHE", str(tmp_path))
    monkeypatch.setattr(aot, "_LOADED", {})
    folder = tmp_path / "compiled"
    folder.mkdir()
    source = built["cache"] / "compiled" / aot.package_path(built["key"]).name
    real = folder / source.name
    real.write_bytes(source.read_bytes())
    real.with_suffix(".json").write_text(source.with_suffix(".json").read_text())
    os.utime(real, (500, 500))  # built before the others ...
    stand_ins = {}
    for age, name in enumerate(("old", "middle", "recent")):
        stand_ins[name] = folder / f"{name}{aot.SUFFIX}"
        stand_ins[name].write_bytes(b"\0" * 1_000_000)
        stand_ins[name].with_suffix(".json").write_text("{}")
        os.utime(stand_ins[name], (1000 + age, 1000 + age))
    assert aot.load(built["key"]) is not None  # ... but used last: loading marks it used
    real_bytes = dict((path, size) for path, size, _ in aot.packages())[real]
    assert real_bytes > real.stat().st_size  # its sidecar counts too
    assert [p for p, _, _ in aot.packages()] == [stand_ins["old"], stand_ins["middle"], stand_ins["recent"], real]
    assert aot.evict(None) == []
    assert aot.evict((real_bytes + 1_500_000) / aot.GB) == [stand_ins["old"], stand_ins["middle"]]
    assert not stand_ins["old"].with_suffix(".json").exists()
    assert [p for p, _, _ in aot.packages()] == [stand_ins["recent"], real]
    assert aot.evict(0.0, keep=real) == [stand_ins["recent"]]  # never the package just built
    assert [p for p, _, _ in aot.packages()] == [real] and aot.load(built["key"]) is not None


def test_a_package_that_predicts_otherwise_is_rejected_once_not_rebuilt_by_every_job(
        built: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("UNET_PIPELINE_CACHE", str(tmp_path))
    monkeypatch.setattr(aot, "TOLERANCE", -1.0)  # no package can pass: as one whose probabilities drifted
    net, key = built["net"], built["key"]
    with caplog.at_level(logging.WARNING):
        assert aot.build(net, key) is None
    assert any("not used" in r.message and "probabilities differ" in r.message for r in caplog.records)
    assert not aot.package_path(key).exists() and aot.rejected(key) is not None
    assert aot.load(key) is None

    def must_not_compile(*args: object, **kwargs: object) -> None:
        raise AssertionError("compiled again")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", must_not_compile)
    assert aot.build(net, key) is None  # the next job goes straight to torch.compile or eager
    other = aot.key_for(net, (3, *SHAPE[1:]), "cpu")
    assert aot.rejected(other) is None  # the rejection holds for its own key only


def test_the_check_compares_probabilities_not_raw_logits() -> None:
    logits = torch.tensor([[[40.0], [0.0]]])
    drift = logits + torch.tensor([[[3e-4], [0.0]]])  # float32 rounding at this scale
    assert float((aot._probabilities(drift) - aot._probabilities(logits)).abs().max()) <= aot.TOLERANCE
    flipped = torch.tensor([[[0.0], [0.1]]])
    assert float((aot._probabilities(flipped) - aot._probabilities(torch.zeros(1, 2, 1))).abs().max()) > aot.TOLERANCE
