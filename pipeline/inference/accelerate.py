"""Networks made fast for CPU inference, once per network: ``torch.compile``.

For long jobs, ``torch.compile`` (Inductor, with frozen weights) gives about 1.6x the
windows per second of eager PyTorch on this project's 2-core machine, at a
one-off compile cost of several seconds per window-batch shape (cached on disk by
Inductor across processes). So the engine compiles only when a job is long enough
to pay for it: ``compile="auto"`` switches a network to its compiled copy once this
process has more than :data:`COMPILE_AFTER_WINDOWS` windows to evaluate with it (the
batch still ahead, or what it has already evaluated).
Compilation needs a C++ compiler; where it fails, inference goes on with the
eager network (logged once).

The compiled copy is cached per network object and rebuilt when its weights change in
place (training-time validation).
"""

from __future__ import annotations

import copy
import logging
import weakref
from typing import Literal

import torch

logger = logging.getLogger(__name__)

CompileMode = Literal["auto", "on", "off"]
#: Windows after which ``compile="auto"`` compiles (about 20-40 s of eager work on 2 cores).
COMPILE_AFTER_WINDOWS = 1000

_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_WINDOWS_SEEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COMPILE_FAILED: set[str] = set()


def _weights_version(network: torch.nn.Module) -> tuple[int, ...]:
    return tuple(p._version for p in network.parameters())


def compiled(network: torch.nn.Module) -> torch.nn.Module | None:
    """``torch.compile`` of a copy of ``network`` with frozen weights (Inductor), cached; ``None`` if unavailable.

    Args:
        network: a float32 network on the CPU, in evaluation mode.
    """
    key = str(type(network))
    if key in _COMPILE_FAILED:
        return None
    cached = _COMPILED.get(network)
    if cached is not None and cached[0] == _weights_version(network):
        return cached[1]
    try:
        import torch._inductor.config as inductor_config

        # Frozen weights let Inductor pre-pack them and fold constants: inference only.
        inductor_config.freezing = True
        fast = torch.compile(copy.deepcopy(network).eval(), dynamic=False)
    except Exception as error:  # no compiler backend on this platform
        _COMPILE_FAILED.add(key)
        logger.warning("torch.compile unavailable (%s); using the eager network", str(error).splitlines()[0][:120])
        return None
    _COMPILED[network] = (_weights_version(network), fast)
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
    if cached is not None and cached[0] == _weights_version(network):
        return True  # already paid for: never fall back to the slower copy near the end of a batch
    return mode == "on" or max(seen, windows * max(1, volumes_left)) > COMPILE_AFTER_WINDOWS
