"""Networks made fast for CPU inference: OpenVINO's IR, else a package compiled ahead of time, else ``torch.compile``.

* **OpenVINO** (:mod:`pipeline.inference.openvino_runtime`), where it imports and
  ``UNET_PIPELINE_CPU_RUNTIME`` is not ``torch``: the network converted once and kept in the same
  cache, built and used exactly where the package below would be; 1.6-2.0x the package's speed
  on an AMD Zen 4 in bf16.
* **Ahead of time** (:mod:`pipeline.inference.aot`): a package of this network compiled
  for this torch, device and window batch is kept in the per-user cache. Any job uses
  it once it exists, a single scan included: it loads in well under a second.
* **Building it** costs about as much as a ``torch.compile`` warm-up (tens of seconds on
  2 cores), so a job builds it only when it is long enough to pay for it:
  ``compile="auto"`` does so once this process has more than
  :data:`COMPILE_AFTER_WINDOWS` windows to evaluate with the network (the batch still
  ahead, or what it has already evaluated); every later process then finds it. Where
  AOTInductor cannot build it, ``torch.compile`` (Inductor, frozen weights; about 1.6x
  eager on 2 cores) serves the process instead, as before.

**Precision** (``evaluate.precision``, stored with the model): ``auto`` runs the network
in bfloat16 autocast on a CPU with a native bf16 dot product (AVX-512 BF16 or AMX), where
a 32x48x32 batch of four runs 1.8x faster compiled than in float32, and in float32 on
other CPUs, where oneDNN would emulate bf16 more slowly. Softmax, blending and stitching
stay float32. On CUDA the engine autocasts to float16 whatever this says.

Compilation needs a C++ compiler; where it fails, inference goes on with the eager
network (logged once). The compiled copy is cached per network object and rebuilt when
its weights change in place (training-time validation, which never compiles).
"""

from __future__ import annotations

import copy
import functools
import logging
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch

from pipeline.inference import aot, openvino_runtime

logger = logging.getLogger(__name__)

CompileMode = Literal["auto", "on", "off"]
Precision = Literal["auto", "float32", "bfloat16"]
# CPU flags of a native bfloat16 dot product: oneDNN emulates bf16 without them, slower than float32.
_NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}
#: Windows after which ``compile="auto"`` compiles (about 20-40 s of eager work on 2 cores).
COMPILE_AFTER_WINDOWS = 1000

_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_WINDOWS_SEEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COMPILE_FAILED: set[str] = set()
Runner = Callable[[torch.Tensor], torch.Tensor]


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has a native bfloat16 dot product (AVX-512 BF16 or AMX) that oneDNN uses."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return bool(_NATIVE_BF16_FLAGS & set(flags.split()))


def cpu_precision(precision: str) -> str:
    """What ``precision`` runs as on this CPU: ``float32`` or ``bfloat16`` (``auto``: bf16 where it is native).

    Args:
        precision: ``auto``, ``float32`` or ``bfloat16``.
    """
    if precision == "auto":
        return "bfloat16" if cpu_has_native_bf16() else "float32"
    return precision


def _weights_version(network: torch.nn.Module) -> tuple[int, ...]:
    return tuple(p._version for p in network.parameters())


def ahead_of_time(network: torch.nn.Module, input_shape: Sequence[int], precision: str = "float32") -> Runner | None:
    """The package compiled earlier for ``network`` and ``input_shape`` on the CPU, if the cache holds one.

    Args:
        network: a float32 network on the CPU, in evaluation mode.
        input_shape: the batch it will take.
        precision: ``float32`` or ``bfloat16`` (resolved).
    """
    if str(type(network)) in _COMPILE_FAILED:
        return None
    key = aot.key_for(network, input_shape, "cpu", precision)
    fast = openvino_runtime.load(key) if openvino_runtime.enabled() else None
    return fast or aot.load(key)


def build_ahead_of_time(network: torch.nn.Module, input_shape: Sequence[int], precision: str = "float32",
                        cache_max_gb: float | None = aot.DEFAULT_MAX_GB) -> Runner | None:
    """Build into the cache what later jobs load (:func:`ahead_of_time`): OpenVINO's IR where it is on, else the
    AOTInductor package; ``None`` where neither builds.

    Args:
        network: a float32 network on the CPU, in evaluation mode.
        input_shape: the batch it will take.
        precision: ``float32`` or ``bfloat16`` (resolved).
        cache_max_gb: ``registry.compiled_cache_max_gb``, the cap of the cache.
    """
    key = aot.key_for(network, input_shape, "cpu", precision)
    fast = openvino_runtime.build(network, key, cache_max_gb) if openvino_runtime.enabled() else None
    return fast or aot.build(network, key, cache_max_gb)


def compiled(network: torch.nn.Module, input_shape: Sequence[int], precision: str = "float32",
             cache_max_gb: float | None = aot.DEFAULT_MAX_GB) -> Runner | None:
    """A compiled ``network`` for ``input_shape``: the ahead-of-time package, built now, else ``torch.compile``.

    Cached per network object; ``None`` where nothing can be compiled.

    Args:
        network: a float32 network on the CPU, in evaluation mode.
        input_shape: the batch it will take.
        precision: ``float32`` or ``bfloat16`` (resolved).
        cache_max_gb: ``registry.compiled_cache_max_gb``, the cap of the cache the package is built into.
    """
    key = str(type(network))
    if key in _COMPILE_FAILED:
        return None
    shape = tuple(input_shape)
    cached = _COMPILED.get(network)
    if cached is not None and cached[0] == (_weights_version(network), shape, precision):
        return cached[1]
    fast = build_ahead_of_time(network, shape, precision, cache_max_gb)
    if fast is None:
        try:
            import torch._inductor.config as inductor_config

            # Frozen weights let Inductor pre-pack them and fold constants: inference only.
            inductor_config.freezing = True
            fast = torch.compile(aot.runnable(copy.deepcopy(network).eval(), precision), dynamic=False)
        except Exception as error:  # no compiler backend on this platform
            _COMPILE_FAILED.add(key)
            logger.warning("torch.compile unavailable (%s); using the eager network", str(error).splitlines()[0][:120])
            return None
    _COMPILED[network] = ((_weights_version(network), shape, precision), fast)
    return fast


def compile_failed(network: torch.nn.Module, error: BaseException) -> None:
    """Record that the compiled copy failed at its first call, so it is not tried again.

    Args:
        network: the original network.
        error: what the compiler raised.
    """
    _COMPILE_FAILED.add(str(type(network)))
    _COMPILED.pop(network, None)
    logger.warning("torch.compile failed (%s); using the eager network", str(error).splitlines()[0][:120])


def should_compile(network: torch.nn.Module, windows: int, mode: CompileMode, volumes_left: int = 1) -> bool:
    """Whether the next volume (``windows`` windows) should run on the compiled network.

    ``auto`` compiles when the job still ahead (this volume's windows times the volumes
    left in the batch) or the windows this process has already evaluated with ``network``
    exceed :data:`COMPILE_AFTER_WINDOWS`: then the compile cost is paid back.

    Args:
        network: the original network.
        windows: the windows the next volume needs.
        mode: ``auto``, ``on`` or ``off``.
        volumes_left: volumes of this size still to predict, the next one included.
    """
    if mode == "off" or str(type(network)) in _COMPILE_FAILED:
        return False
    seen = _WINDOWS_SEEN.get(network, 0) + windows
    _WINDOWS_SEEN[network] = seen
    cached = _COMPILED.get(network)
    if cached is not None and cached[0][0] == _weights_version(network):
        return True  # already paid for: never fall back to the slower copy near the end of a batch
    return mode == "on" or max(seen, windows * max(1, volumes_left)) > COMPILE_AFTER_WINDOWS

