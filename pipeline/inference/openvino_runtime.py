"""The CPU network served by OpenVINO: the fastest runtime measured for ``predict`` on a CPU.

On an AMD Zen 4 (2 cores) a batch of 4 windows ran 1.6-2.0x as fast through OpenVINO's CPU plugin in bf16
as through the AOTInductor package, and a whole ``predict`` job of 24 hippocampus scans took 0.68 of the
time, its masks within bf16 rounding of float32's (docs/results.md, "Closing the gap").

The network is converted once (``openvino.convert_model``, 2-9 s) and kept as IR in the compiled-network
cache beside the AOT packages, under the same key (weights, torch version, device, window batch,
precision) with a ``.ov.xml``/``.ov.bin`` pair and a sidecar repeating the key; the cache's cap and
eviction count it (:mod:`pipeline.inference.aot`). Each process compiles the IR for the CPU (0.1-0.2 s)
with the precision as OpenVINO's inference precision hint and torch's thread count, and compiles again
when a job's share of the CPUs changes (:func:`pipeline.cpus.rebalance`). An IR whose probabilities differ
from the eager float32 network's by more than :data:`TOLERANCE` (float32), or in bf16 by more than 1.5x
torch's own bf16 autocast does on the same input (at least the AOT package's bf16 tolerance), is not used,
and that is remembered.

``UNET_PIPELINE_CPU_RUNTIME=torch`` turns it off (the AOT package, ``torch.compile`` or eager then serve,
as before); so does OpenVINO not being importable.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data import write_text_atomic
from pipeline.inference import aot

logger = logging.getLogger(__name__)

#: ``openvino`` (default, where it imports) or ``torch``.
RUNTIME_ENV = "UNET_PIPELINE_CPU_RUNTIME"
#: The IR's suffix in the compiled-network cache (its weights: ``.ov.bin``).
SUFFIX = ".ov.xml"
#: float32 through OpenVINO sums in other orders than torch: probabilities agree to about 2e-4.
TOLERANCE = 1e-3

#: In bf16, how far beyond torch's own bf16 difference from float32 OpenVINO's may go.
BF16_SLACK = 1.5

_LOADED: dict[str, _Runner] = {}


def enabled() -> bool:
    """Whether OpenVINO serves the CPU network: not turned off by :data:`RUNTIME_ENV`, and importable."""
    return _enabled(os.environ.get(RUNTIME_ENV, "openvino").strip().lower())


@functools.cache
def _enabled(runtime: str) -> bool:
    # Decided once per value of the variable: a failed import is not retried on every window batch.
    if runtime == "torch":
        return False
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def ir_path(key: aot.AotKey) -> Path:
    """Where the IR of ``key`` lives in the compiled-network cache.

    Args:
        key: the network, torch version, device, window batch and precision (:func:`aot.key_for`).
    """
    return aot.package_path(key).with_name(f"{key.digest()}{SUFFIX}")


def companions(path: Path) -> tuple[Path, Path, Path]:
    """The files that belong to the IR at ``path``: its weights, sidecar and rejection note.

    Args:
        path: a ``.ov.xml`` file.
    """
    weights, sidecar, rejection = aot.parts(path)[1:]
    return weights, sidecar, rejection


class _Runner:
    """The IR compiled for this CPU, called like the network: a float32 batch in, float32 logits out.

    Args:
        path: the ``.ov.xml`` file.
        precision: ``float32`` or ``bfloat16``, OpenVINO's inference precision hint.
    """

    def __init__(self, path: Path, precision: str) -> None:
        import openvino as ov

        self.model = ov.Core().read_model(str(path))
        self.hint = "bf16" if precision == "bfloat16" else "f32"
        self.threads = 0
        self.request: Any = None

    def _compile(self, threads: int) -> None:
        import openvino as ov

        # No pinning: OpenVINO pins its threads to the first cores by default, so two jobs sharing a host (each
        # with its share, pipeline.cpus) would both sit on core 0 while the other cores idle.
        compiled = ov.Core().compile_model(self.model, "CPU", {
            "INFERENCE_PRECISION_HINT": self.hint, "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False})
        self.request, self.threads = compiled.create_infer_request(), threads

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        threads = torch.get_num_threads()
        if threads != self.threads:  # the job's share of the CPUs changed (pipeline.cpus.rebalance)
            self._compile(threads)
        out = self.request.infer([x.detach().contiguous().float().numpy()])[0]
        return torch.from_numpy(np.array(out, dtype=np.float32))


def load(key: aot.AotKey) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The IR of ``key`` compiled for this CPU, or ``None`` where there is none that can be trusted.

    Args:
        key: what the IR must have been converted for.
    """
    path = ir_path(key)
    if str(path) in _LOADED:
        return _LOADED[str(path)]
    if not path.is_file() or not aot.sidecar_matches(companions(path)[1], key):
        return None
    try:
        runner = _Runner(path, key.precision)
    except Exception as error:  # a torn or foreign file: OpenVINO raises its own types
        logger.warning("OpenVINO network %s does not load (%s); using the network without it", path.name,
                       str(error).splitlines()[0][:120] if str(error) else error.__class__.__name__)
        return None
    _LOADED[str(path)] = runner
    aot._mark_used(path)
    return runner


def build(network: torch.nn.Module, key: aot.AotKey,
          cache_max_gb: float | None = aot.DEFAULT_MAX_GB) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Convert ``network`` for ``key`` into the cache (checked against the eager network) and load it.

    Args:
        network: the float32 network, in evaluation mode, on the CPU.
        key: the window batch, precision and versions to convert for.
        cache_max_gb: ``registry.compiled_cache_max_gb`` (the cache's cap, with the AOT packages).

    Returns:
        The network as OpenVINO runs it, or ``None`` (logged) where it cannot convert or does not match.
    """
    path = ir_path(key)
    weights, sidecar, rejection = companions(path)
    if aot.rejection_reason(rejection, key):
        return None
    import openvino as ov

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{uuid.uuid4().hex[:8]}.{os.getpid()}{SUFFIX}")
    example = torch.randn(key.input_shape, generator=torch.Generator().manual_seed(0))
    started = time.monotonic()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # Tracing warns about every Python branch on a shape; the check against eager below is what counts.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            model = ov.convert_model(network.eval(), example_input=example)
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        runner = _Runner(tmp, key.precision)
        with torch.inference_mode():
            truth = aot._probabilities(network(example))  # float32
            difference = float((aot._probabilities(runner(example)) - truth).abs().max())
            # In bf16 the yardstick is torch's own bf16 rounding on the same input (a noise input strays further
            # than a scan): OpenVINO may round differently, not by much more.
            allowed = TOLERANCE if key.precision != "bfloat16" else max(aot.TOLERANCE_BF16, BF16_SLACK * float(
                (aot._probabilities(aot.runnable(network, key.precision)(example)) - truth).abs().max()))
    except Exception as error:  # an operator OpenVINO cannot take
        for part in (tmp, *companions(tmp)):
            part.unlink(missing_ok=True)
        logger.warning("OpenVINO conversion unavailable (%s)", str(error).splitlines()[0][:120] if str(error)
                       else error.__class__.__name__)
        return None
    bin_tmp = companions(tmp)[0]
    if not difference <= allowed:
        tmp.unlink(missing_ok=True)
        bin_tmp.unlink(missing_ok=True)
        reason = f"its probabilities differ from the eager float32 network's by {difference:.2g} (allowed {allowed:.2g})"
        write_text_atomic(rejection, json.dumps({"key": asdict(key), "reason": reason}, indent=1))
        logger.warning("OpenVINO network not used: %s", reason)
        return None
    # The weights first, then the sidecar, then the IR that load() looks for: never an IR without its weights.
    # The runner compiled for the check is kept: renaming its files leaves what it read untouched.
    os.replace(bin_tmp, weights)
    write_text_atomic(sidecar, json.dumps(asdict(key), indent=1))
    os.replace(tmp, path)
    logger.info("converted the network for OpenVINO (%s, %s) in %.0f s (%s)", "x".join(map(str, key.input_shape)),
                key.precision, time.monotonic() - started, path.name)
    _LOADED[str(path)] = runner
    aot.evict(cache_max_gb, keep=path)
    return runner
