"""Choosing the torch device at run time (CUDA when present, else the CPU) and the precision training autocasts to."""

from __future__ import annotations

import torch

from pipeline.inference import accelerate


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU.

    Args:
        name: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The type ``train.amp`` autocasts training's forward pass to; ``None`` trains in float32.

    float16 with gradient scaling on CUDA (as nnU-Net); bfloat16 on a CPU with a native
    bf16 dot product (AVX-512 BF16 or AMX), where a 3D U-Net step runs about 1.5x faster
    (``scripts/profile_training.py``); float32 on other CPUs, where oneDNN would emulate
    bf16 more slowly than float32. Weights and optimiser stay float32 (inference: ``evaluate.precision``).

    Args:
        device: where training runs.
        amp: ``train.amp``.
    """
    if not amp:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and accelerate.cpu_has_native_bf16():
        return torch.bfloat16
    return None
