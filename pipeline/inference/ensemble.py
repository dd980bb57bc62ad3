"""A fold ensemble in one checkpoint file: every fold's exported model, and what applies to their average.

The folds of one cross-validation (each ``checkpoints/fold_K/model.pt``: weights, architecture,
plan, patch size and the inference settings it was validated with) are stored side by side
under ``members``. Each member keeps its own mirroring, overlap, blending and window batch;
:class:`~pipeline.inference.Predictor` averages their probabilities. The file's own
``inference`` section holds what applies to the average, not to one fold: the
postprocessing and the quality estimate's calibration. One file means everything that
handles one checkpoint path (registry download, model cache, pyfunc, PACS, gate) handles
an ensemble too, through :func:`pipeline.inference.load_models`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import InputDataError, PipelineError
from pipeline.inference.checkpoints import ENSEMBLE_MEMBERS, save_checkpoint

KIND = "fold_ensemble"
#: What a member must hold to be rebuilt into a network.
MEMBER_KEYS = ("model", "plan", "patch_size", "state_dict")
#: The ensemble-level settings that replace each member's when the members are loaded.
SHARED_SETTINGS = ("postprocessing", "quality")


def is_ensemble(ckpt: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's content is a fold ensemble's.

    Args:
        ckpt: what :func:`~pipeline.inference.checkpoints.read_checkpoint_file` returned.
    """
    return ENSEMBLE_MEMBERS in ckpt


def check_same_plan(plans: Sequence[Mapping[str, Any]], names: Sequence[str]) -> None:
    """Raise unless every plan equals the first (the folds of one ensemble read a scan one way).

    Args:
        plans: the members' preprocessing plans.
        names: what to call each member in the message (e.g. ``fold 2``).
    """
    first = plans[0]
    for name, plan in zip(names[1:], plans[1:]):
        if plan != first:
            differ = sorted(k for k in set(first) | set(plan) if first.get(k) != plan.get(k))
            raise PipelineError(f"{name}: its preprocessing plan differs from {names[0]}'s ({', '.join(differ)}); "
                                "the folds of one ensemble must share one plan (same data and config)")


def save_ensemble(members: Sequence[Mapping[str, Any]], names: Sequence[str], inference: Mapping[str, Any],
                  folds: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Write the ensemble file (atomically, loadable with ``weights_only=True``).

    Args:
        members: each fold's exported checkpoint content (``model.pt``).
        names: what to call each member in errors (e.g. ``fold 2``).
        inference: the ensemble's own ``postprocessing`` and ``quality`` (calibration) sections.
        folds: each fold's provenance (fold, run id, version, validation Dice): plain data, no paths.
        path: the target file.

    Returns:
        ``path``.
    """
    if not members:
        raise PipelineError("an ensemble needs at least one fold")
    check_same_plan([m["plan"] for m in members], names)
    kept = [{k: v for k, v in m.items() if k not in ("format", "optimizer", "scaler", "torch_rng")} for m in members]
    shared = {k: v for k, v in inference.items() if k in SHARED_SETTINGS}
    save_checkpoint({"kind": KIND, ENSEMBLE_MEMBERS: kept, "inference": shared, "folds": [dict(f) for f in folds]},
                    path)
    return path


def members_of(ckpt: Mapping[str, Any], path: Path) -> list[dict[str, Any]]:
    """Each member as :func:`~pipeline.inference.load_model_from_checkpoint` takes it: its own settings,
    with the ensemble's postprocessing and calibration.

    Args:
        ckpt: the ensemble file's content.
        path: the file (for the messages).

    Raises:
        InputDataError: the file is not a complete fold ensemble.
    """
    members = ckpt.get(ENSEMBLE_MEMBERS)
    if ckpt.get("kind") != KIND or not isinstance(members, list) or not members:
        raise InputDataError(path, "is not a fold ensemble of this pipeline (no list of member models)")
    for i, member in enumerate(members):
        if not isinstance(member, dict) or not set(MEMBER_KEYS) <= member.keys():
            raise InputDataError(path, f"member {i} of the fold ensemble is incomplete (needs {', '.join(MEMBER_KEYS)})")
    try:
        check_same_plan([m["plan"] for m in members], [f"member {i}" for i in range(len(members))])
    except PipelineError as error:
        raise InputDataError(path, str(error)) from None
    own = ckpt.get("inference")
    shared = {k: v for k, v in own.items() if k in SHARED_SETTINGS} if isinstance(own, dict) else {}
    return [{**m, "inference": {**(m.get("inference") or {}), **shared}} for m in members]
