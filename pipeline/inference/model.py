"""Models as they are handed over: a checkpoint rebuilt into a network with its plan and settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.unet import UNet
from pipeline.errors import InputDataError
from pipeline.inference import accelerate, aot, ensemble
from pipeline.inference.checkpoints import load_checkpoint, read_checkpoint_file
from pipeline.inference.settings import InferenceSettings
from pipeline.inference.sliding_window import window_size
from pipeline.quality import Calibration


@dataclass
class LoadedModel:
    """A network with the preprocessing plan and inference settings it was trained and validated with.

    Args:
        network: the U-Net, in evaluation mode.
        plan: the preprocessing plan (orientation, spacing, normalisation, labels).
        patch_size: the training patch size (the window).
        settings: the stored inference settings.
        checkpoint: the checkpoint metadata (without weights).
    """

    network: UNet
    plan: dict[str, Any]
    patch_size: list[int]
    settings: InferenceSettings
    checkpoint: dict[str, Any]

    @property
    def labels(self) -> dict[int, str]:
        """Label value -> name, background included."""
        return {int(k): v for k, v in self.plan["labels"].items()}

    @property
    def calibration(self) -> Calibration | None:
        """The quality-estimate calibration fitted on validation (``None`` for models saved before it existed)."""
        return Calibration.from_dict((self.checkpoint.get("inference") or {}).get("quality"))


def load_model(path: Path, device: torch.device) -> LoadedModel:
    """Build the U-Net of a checkpoint and load its weights (``weights_only=True``).

    Args:
        path: a ``.pt`` checkpoint written by the train or run stage.
        device: where to put the network.
    """
    return load_model_from_checkpoint(load_checkpoint(path), device)


def load_models(path: Path, device: torch.device) -> list[LoadedModel]:
    """The models of a checkpoint file: one model's, or every fold of a fold ensemble (``weights_only=True``).

    What turns one checkpoint path (a registered version, a file) into a
    :class:`~pipeline.inference.Predictor`'s models: ``Predictor(load_models(path, device), device)``.

    Args:
        path: a ``.pt`` checkpoint written by the run stage, or a fold ensemble's file.
        device: where to put the networks.

    Raises:
        InputDataError: the file is not ours, is torn, or a member does not load.
    """
    ckpt = read_checkpoint_file(path)
    if not ensemble.is_ensemble(ckpt):
        return [load_model_from_checkpoint(ckpt, device)]
    models = []
    for i, member in enumerate(ensemble.members_of(ckpt, path)):
        try:
            models.append(load_model_from_checkpoint(member, device))
        except (RuntimeError, KeyError, TypeError, ValueError) as exc:  # weights that do not fit the architecture
            raise InputDataError(path, f"member {i} of the fold ensemble does not load ({exc.__class__.__name__})") from None
    return models


def load_model_from_checkpoint(ckpt: Mapping[str, Any], device: torch.device) -> LoadedModel:
    """Build the U-Net of an already loaded checkpoint (see :func:`load_model`).

    Args:
        ckpt: the checkpoint's content.
        device: where to put the network.
    """
    network = UNet(**ckpt["model"])
    network.load_state_dict(ckpt["state_dict"])
    network.to(device).eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer", "scaler", "torch_rng")}
    settings = InferenceSettings.from_dict(ckpt.get("inference"))
    return LoadedModel(network, ckpt["plan"], list(ckpt["patch_size"]), settings, meta)


def compile_ahead_of_time(path: Path, precision: str | None = None,
                          cache_max_gb: float | None = aot.DEFAULT_MAX_GB) -> bool:
    """Compile a checkpoint's network(s) once for ``predict`` on the CPU (at registration): the packages later jobs load.

    The package takes what the engine feeds it with the stored settings: full batches
    of ``sw_batch_size`` windows.

    Args:
        path: a ``.pt`` checkpoint (one model's or a fold ensemble's).
        precision: the precision to compile for (``--precision``); ``None``: the model's stored one.
        cache_max_gb: ``registry.compiled_cache_max_gb``, the compiled-network cache's cap.

    Returns:
        Whether the package (every fold's) is in the cache now (``False``: this platform cannot build one).
    """
    ready = True
    for model in load_models(path, torch.device("cpu")):  # a fold ensemble: one package per fold
        dims = model.network.spatial_dims
        window = window_size(model.patch_size, dims)
        shape = (model.settings.sw_batch_size, len(model.plan["modalities"]), *window[:dims])
        runs_as = accelerate.cpu_precision(precision or model.settings.precision)
        ready = (accelerate.ahead_of_time(model.network, shape, runs_as) is not None
                 or accelerate.build_ahead_of_time(model.network, shape, runs_as, cache_max_gb) is not None) and ready
    return ready
