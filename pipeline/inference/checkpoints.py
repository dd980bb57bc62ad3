"""Checkpoint files: written atomically, read with ``weights_only=True`` only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import InputDataError

CHECKPOINT_FORMAT = 1
#: The key under which a fold ensemble's file holds its models' checkpoints.
ENSEMBLE_MEMBERS = "members"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` through a temporary file and a rename, so a crash never leaves a torn file.

    Args:
        state: plain data and tensors only (loadable with ``weights_only=True``).
        path: the target ``.pt`` file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)
    os.replace(tmp, path)


def read_checkpoint_file(path: Path) -> dict[str, Any]:
    """Read any checkpoint of ours, one model's or a fold ensemble's, with ``weights_only=True``.

    Args:
        path: a ``.pt`` file written by :func:`save_checkpoint`.
    """
    if not Path(path).is_file():
        raise InputDataError(path, "checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for torn or foreign files
        raise InputDataError(path, f"not a readable checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or not (
            "state_dict" in ckpt or ENSEMBLE_MEMBERS in ckpt):
        raise InputDataError(path, "not a unet-pipeline checkpoint")
    return ckpt


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read one model's checkpoint with ``weights_only=True`` (no arbitrary code from pickles).

    Args:
        path: a ``.pt`` file written by :func:`save_checkpoint`.
    """
    ckpt = read_checkpoint_file(path)
    if "state_dict" not in ckpt:
        # A fold ensemble: only pipeline.inference.load_models turns it into networks.
        raise InputDataError(path, "is a fold ensemble, not one model's checkpoint")
    return ckpt
