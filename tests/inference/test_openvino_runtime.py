"""OpenVINO serving the CPU network: converted once into the cache, checked against eager, loaded by later jobs,
recompiled when the job's threads change, evicted with its weights, and off when asked."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from models.unet import UNet
from pipeline.inference import accelerate, aot, openvino_runtime

pytest.importorskip("openvino")  # a dependency of the project: present wherever it is installed

SHAPE = (2, 1, 16, 16, 16)


def _net(seed: int) -> UNet:
    torch.manual_seed(seed)
    return UNet(spatial_dims=3, in_channels=1, out_channels=3, features=[4, 8], norm="instance").eval()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("UNET_PIPELINE_CACHE", str(tmp_path))
    monkeypatch.setenv(openvino_runtime.RUNTIME_ENV, "openvino")
    monkeypatch.setattr(openvino_runtime, "_LOADED", {})
    monkeypatch.setattr(aot, "_LOADED", {})
    return tmp_path


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_converted_once_it_equals_eager_and_a_later_job_loads_it(cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 precision: str) -> None:
    net = _net(1)
    fast = accelerate.build_ahead_of_time(net, SHAPE, precision)
    assert isinstance(fast, openvino_runtime._Runner)  # OpenVINO first, not the AOT package
    key = aot.key_for(net, SHAPE, "cpu", precision)
    path = openvino_runtime.ir_path(key)
    assert path.is_file() and path.parent == cache / "compiled"
    assert all(p.is_file() for p in openvino_runtime.companions(path)[:2])  # its weights and its sidecar
    assert not aot.package_path(key).exists()  # no AOT package built beside it
    x = torch.randn(SHAPE)
    with torch.inference_mode():
        truth = torch.softmax(net(x), 1)
        torch_bf16 = float((torch.softmax(aot.runnable(net, "bfloat16")(x).float(), 1) - truth).abs().max())
        served = torch.softmax(fast(x), 1)
    assert served.dtype == torch.float32 and served.shape == truth.shape
    tolerance = max(aot.TOLERANCE_BF16, 1.5 * torch_bf16) if precision == "bfloat16" else openvino_runtime.TOLERANCE
    assert float((served - truth).abs().max()) <= tolerance

    monkeypatch.setattr(openvino_runtime, "_LOADED", {})  # as a new process

    def must_not_convert(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted again")

    import openvino

    monkeypatch.setattr(openvino, "convert_model", must_not_convert)
    again = accelerate.ahead_of_time(net, SHAPE, precision)
    assert isinstance(again, openvino_runtime._Runner) and again is not fast
    with torch.inference_mode():
        torch.testing.assert_close(again(x), fast(x))


def test_the_job_s_new_share_of_the_cpus_recompiles_it(cache: Path) -> None:
    fast = accelerate.build_ahead_of_time(_net(2), SHAPE)
    before = torch.get_num_threads()
    x = torch.randn(SHAPE)
    try:
        torch.set_num_threads(1)
        first = fast(x)
        assert fast.threads == 1
        torch.set_num_threads(2)
        second = fast(x)
        assert fast.threads == 2  # pipeline.cpus.rebalance changed torch's threads: OpenVINO follows
        torch.testing.assert_close(first, second, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(before)


def test_the_ir_counts_in_the_caches_cap_and_leaves_with_its_weights(cache: Path) -> None:
    net = _net(3)
    accelerate.build_ahead_of_time(net, SHAPE)
    path = openvino_runtime.ir_path(aot.key_for(net, SHAPE, "cpu"))
    weights = openvino_runtime.companions(path)[0]
    [(listed, size, _)] = aot.packages()
    assert listed == path and size >= path.stat().st_size + weights.stat().st_size
    assert aot.evict(0.0) == [path]
    assert not path.exists() and not weights.exists() and not openvino_runtime.companions(path)[1].exists()


def test_an_ir_that_predicts_otherwise_is_rejected_once(cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(openvino_runtime, "TOLERANCE", -1.0)  # nothing can pass: as an IR whose numbers drifted
    net = _net(4)
    key = aot.key_for(net, SHAPE, "cpu")
    with caplog.at_level(logging.WARNING):
        assert openvino_runtime.build(net, key) is None
    assert any("OpenVINO network not used" in r.message for r in caplog.records)
    assert not openvino_runtime.ir_path(key).exists()
    assert not list((cache / "compiled").glob(".*"))  # no half-written file left behind
    rejection = openvino_runtime.companions(openvino_runtime.ir_path(key))[2]
    assert "probabilities differ" in json.loads(rejection.read_text())["reason"]
    import openvino

    def must_not_convert(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(openvino, "convert_model", must_not_convert)
    assert openvino_runtime.build(net, key) is None  # the next job does not convert it again


def test_turned_off_the_torch_runtimes_serve_as_before(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(openvino_runtime.RUNTIME_ENV, "torch")
    assert not openvino_runtime.enabled()
    net = _net(5)
    assert accelerate.ahead_of_time(net, SHAPE) is None
    assert not (cache / "compiled").exists() or not list((cache / "compiled").glob(f"*{openvino_runtime.SUFFIX}"))
