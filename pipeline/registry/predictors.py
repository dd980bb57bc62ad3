"""Model references turned into one predictor: what ``predict``, ``evaluate`` and ``pacs`` run.

A reference is a registered version or alias, a run's model, a checkpoint file, or a
folder of ``fold_*/final.pt``. Each resolves to one checkpoint file, which holds one
model or a fold ensemble (every fold); all the models found are averaged.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import InputDataError, PipelineError
from pipeline.registry import model_cache
from pipeline.registry.registration import ResolvedModel, resolve_model


def checkpoints_of(ref: str) -> list[str]:
    """A folder reference means every fold's ``final.pt`` under it (a cross-validation ensemble).

    Args:
        ref: a model reference or a folder.
    """
    path = Path(ref)
    if not path.is_dir():
        return [ref]
    found = sorted(path.glob("fold_*/final.pt")) or sorted(path.glob("final.pt"))
    if not found:
        raise InputDataError(path, "holds no fold_*/final.pt checkpoints to ensemble")
    return [str(p) for p in found]


def load_predictor(model_refs: Sequence[str], work_dir: Path, overrides: Any = None, device_name: str = "auto",
                   series_uid: str | None = None) -> tuple[Any, ResolvedModel]:
    """One predictor averaging every referenced model (all must share one preprocessing plan).

    Args:
        model_refs: model references accepted by :func:`~pipeline.registry.resolve_model`, or folders of
            ``fold_*/final.pt``; several are ensembled (softmax averaged), and a registered fold ensemble
            brings all its folds.
        work_dir: work directory (its SQLite store is the default registry).
        overrides: :class:`~pipeline.inference.Overrides` of the stored inference settings; its
            ``model_cache_max_gb`` caps the model cache the registered versions are fetched through.
        device_name: ``auto``, ``cpu`` or ``cuda``.
        series_uid: the DICOM series to read from folders holding several.

    Returns:
        The predictor and the first model's identity (:class:`~pipeline.registry.ResolvedModel`).
    """
    from pipeline.inference import Predictor, load_models
    from pipeline.training import resolve_device

    device = resolve_device(device_name)
    # The caps of the config ``predict``/``evaluate``/``pacs`` were given (``--config``), else the defaults.
    cache_max_gb = overrides.model_cache_max_gb if overrides is not None else model_cache.DEFAULT_MAX_GB
    models, identities, origins = [], [], []
    for ref in [r for refs in model_refs for r in checkpoints_of(refs)]:
        with tempfile.TemporaryDirectory(prefix="unet-model-") as tmp:
            resolved = resolve_model(ref, work_dir, Path(tmp), cache_max_gb=cache_max_gb)
            try:
                found = load_models(resolved.path, device)
            finally:
                model_cache.release(resolved.path)  # loaded: the cache may evict its copy again
            models += found
            origins += [ref] * len(found)
            identities.append(resolved)
    # The fingerprint differs between folds of separate work directories (each saw other cases); the voxel
    # part must not. (One fold ensemble file was checked to share one whole plan when it was written.)
    # Each model's engine mirrors with its own plan's label pairs (an older model has none).
    own = ("network", "fingerprint", "mirror_pairs")
    voxel_plan = {k: v for k, v in models[0].plan.items() if k not in own}
    for ref, m in zip(origins, models):
        if {k: v for k, v in m.plan.items() if k not in own} != voxel_plan:
            raise PipelineError(f"{ref}: its preprocessing plan differs from the first model's; cannot ensemble")
    return Predictor(models, device, overrides, series_uid), identities[0]
