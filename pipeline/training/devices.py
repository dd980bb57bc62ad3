"""Choosing the torch device at run time: CUDA when present, else the CPU."""

from __future__ import annotations

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU.

    Args:
        name: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
