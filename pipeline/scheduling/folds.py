"""The folds of one cross-validation, as their run states record them: are they all there, and do they belong together?

A fold ensemble may only be built once every fold ``0..num_folds-1`` of one
cross-validation has completed: each ``state/fold_K.json`` says ``completed``, its
config hash is the hash of this very config with ``data.fold=K`` (the same config but
for the fold), and all folds saw the same data (one content hash).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.scheduling.lock import work_dir_lock
from pipeline.scheduling.state import RunState, config_hash, load_state


def cv_config_hash(config: Mapping[str, Any]) -> str:
    """Hash of the configuration without the fold: the same for every fold of one cross-validation.

    Args:
        config: the resolved configuration as a plain mapping (``PipelineConfig.to_dict()``).
    """
    rest = copy.deepcopy(dict(config))
    rest.get("data", {}).pop("fold", None)
    return config_hash(rest)


def _run_command(config_label: str, fold: str) -> str:
    return "`" + " ".join(["unet-pipeline run", *([config_label] if config_label else []), f"--fold {fold}"]) + "`"


def completed_folds(work_dir: Path, config: Mapping[str, Any], config_label: str = "CONFIG") -> list[RunState]:
    """Every fold's completed run state, checked to belong to this config and to one dataset.

    Args:
        work_dir: the work directory (``state/fold_K.json``).
        config: the resolved configuration (``PipelineConfig.to_dict()``); its ``data.num_folds`` says how many.
        config_label: how the messages name the config (the file the user gave).

    Raises:
        PipelineError: a fold has not run or not completed, was trained with another config,
            or the folds saw different data; the message says which fold and what to run.
    """
    num_folds = int(config["data"]["num_folds"])
    states = []
    for fold in range(num_folds):
        state = load_state(work_dir, fold)
        command = _run_command(config_label, str(fold))
        if state is None:
            raise PipelineError(f"fold {fold} has not completed (it has not run): run {command} "
                                f"(the ensemble needs folds 0..{num_folds - 1})")
        if state.status != "completed":
            raise PipelineError(f"fold {fold} has not completed (its last run is '{state.status}'): run {command}")
        same_but_fold = {**config, "data": {**config["data"], "fold": fold}}
        if state.config_hash != config_hash(same_but_fold):
            raise PipelineError(
                f"fold {fold} was trained with another configuration (run {state.run_id}): give the ensemble the "
                f"config and --set options the folds ran with, or train the fold again with {command}")
        states.append(state)
    hashes = {s.data_hash for s in states}
    if len(hashes) > 1:
        by_hash = {h: [s.fold for s in states if s.data_hash == h] for h in sorted(hashes)}
        groups = "; ".join(f"folds {', '.join(map(str, f))} on data {h[:12]}" for h, f in by_hash.items())
        raise PipelineError(f"the folds were trained on different data ({groups}): train the stale folds again "
                            f"with {_run_command(config_label, 'K')}")
    return states


@contextmanager
def locked_folds(work_dir: Path, config: Mapping[str, Any], config_label: str = "CONFIG") -> Iterator[list[RunState]]:
    """Hold every fold's lock (no fold job rewrites its ``model.pt`` meanwhile) and yield :func:`completed_folds`.

    Args:
        work_dir: the work directory.
        config: the resolved configuration (``PipelineConfig.to_dict()``).
        config_label: how the messages name the config.

    Raises:
        LockHeldError: a fold's job is running (exit 3, naming it).
        PipelineError: see :func:`completed_folds`.
    """
    with ExitStack() as locks:
        for fold in range(int(config["data"]["num_folds"])):
            locks.enter_context(work_dir_lock(work_dir, "ensemble", fold))
        yield completed_folds(work_dir, config, config_label)
