"""One scheduled call from start to end: the decision (skip, resume, new), the MLflow run, the state."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.scheduling.state import RunState, code_version, config_hash, decide_run, load_state, now_iso, save_state


def cv_id(config: Mapping[str, Any], data_hash: str) -> str:
    """The cross-validation id: the same for every fold of one config on one dataset, different otherwise.

    A hash of the dataset's content hash and the resolved configuration without
    ``data.fold`` (so ``data.num_folds`` and ``data.split_seed`` count) and without
    ``data.dataset``: the data counts by content, not by where it is mounted, and no path
    reaches the id. Every fold's MLflow run carries it as the tag ``cv.id`` (with
    ``cv.fold``), so ``search_runs(filter_string="tags.`cv.id` = '...'")`` finds the folds.

    Args:
        config: the resolved configuration as a plain mapping (``PipelineConfig.to_dict()``).
        data_hash: the dataset's content hash.

    Returns:
        16 hex digits.
    """
    data = {k: v for k, v in dict(config.get("data", {})).items() if k not in ("fold", "dataset")}
    without_fold = config_hash({**config, "data": data})
    return hashlib.sha256(f"{data_hash}:{without_fold}".encode()).hexdigest()[:16]


@dataclass
class RunKeys:
    """What decides whether a run is up to date: the data's content, the config, the code.

    Args:
        data_hash: the dataset's content hash.
        config_hash: hash of the resolved configuration.
        code: package version, git commit and dirty flag.
        cv_id: the cross-validation id (:func:`cv_id`).
    """

    data_hash: str
    config_hash: str
    code: dict[str, Any]
    cv_id: str = ""


class RunSession:
    """One ``run``/``train`` call's bookkeeping on rank 0: tracking server, run state and MLflow run.

    Args:
        work_dir: the work directory.
        fold: the cross-validation fold.
        tracking_uri: ``mlflow.tracking_uri`` (``None``: the environment's or the work directory's store).
        experiment: the MLflow experiment.
        outage_wait_minutes: how long to wait for a tracking server that went away.
        force: train even when data, config and code are unchanged.
    """

    def __init__(self, work_dir: Path, fold: int, tracking_uri: str | None, experiment: str,
                 outage_wait_minutes: float, force: bool) -> None:
        self.work_dir, self.fold, self.force = work_dir, fold, force
        self.configured_uri, self.experiment, self.wait_minutes = tracking_uri, experiment, outage_wait_minutes
        self.uri: str | None = None
        self.log: Any = None  # the RunLogger, once a run is open
        self.keys: RunKeys | None = None

    def connect(self) -> None:
        """Check the tracking server (exit 5 at once when down, before any preprocessing) and set MLflow up."""
        from mlflow.exceptions import MlflowException

        from pipeline.registry import connect_tracking, setup, tracking_uri
        from pipeline.scheduling.lock import store_setup_lock

        self.uri = tracking_uri(self.configured_uri, self.work_dir)
        # Fold jobs started together would each create and migrate a new SQLite store at once: one at a time.
        local = self.uri.startswith("sqlite:")
        with store_setup_lock(self.work_dir, "mlflow setup", self.fold) if local else nullcontext():
            connect_tracking(self.uri, self.work_dir)
            try:
                setup(self.configured_uri, self.work_dir, self.experiment)
            except MlflowException as exc:
                # Folds started together: another job created the experiment between our lookup and our create.
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                setup(self.configured_uri, self.work_dir, self.experiment)

    def decide(self, config: Mapping[str, Any], data_hash: str, last_checkpoint: Path) -> tuple[str, RunKeys, Any]:
        """What this call does (:func:`decide_run`), with the keys it compared and the state it read.

        Args:
            config: the resolved configuration.
            data_hash: the dataset's content hash.
            last_checkpoint: the fold's ``last.pt`` (its MLflow run id tells whether it can be resumed).
        """
        from pipeline.inference import load_checkpoint

        self.keys = keys = RunKeys(data_hash, config_hash(config), code_version(), cv_id(config, data_hash))
        state = load_state(self.work_dir, self.fold)
        # Only an interrupted run needs to know whose last.pt is there (reading it loads the optimizer state too).
        last_run = None
        if state is not None and state.status == "running" and last_checkpoint.is_file():
            last_run = load_checkpoint(last_checkpoint).get("mlflow_run_id")
        return decide_run(state, keys.data_hash, keys.config_hash, keys.code, self.force, last_run), keys, state

    def open_run(self, action: str, state: RunState | None, params: Mapping[str, Any], config: Mapping[str, Any],
                 artifacts: Mapping[str, Path], folds: Any, tags: Mapping[str, str] | None = None) -> str:
        """Start a new MLflow run, or reopen the interrupted one; log its parameters.

        The run is tagged ``data.fold``, ``cv.fold`` and ``cv.id`` (also when reopened: a run
        started before the tag existed gets it).

        Args:
            action: what :meth:`decide` decided.
            state: the state it read.
            params: the run's MLflow params.
            config: the resolved configuration, without paths.
            artifacts: files to log, by folder.
            folds: the stored split.
            tags: more run tags (set on a reopened run too).
        """
        import mlflow

        from pipeline.registry import RunLogger, when_reachable

        assert self.keys is not None, "decide() first"
        keys = self.keys
        reopen = state.run_id if action in ("resume", "finish") and state is not None else None
        if reopen is None and state is not None and state.status in ("running", "trained") and state.run_id:
            # An interrupted run of other inputs is not going to be finished: say so in MLflow.
            with suppress(Exception):
                mlflow.MlflowClient().set_terminated(state.run_id, "KILLED")
        run_tags = {"data.fold": str(self.fold), "cv.fold": str(self.fold), "cv.id": keys.cv_id, **(tags or {})}
        run = when_reachable(lambda: mlflow.start_run(run_id=reopen, tags=run_tags),
                             self.uri, self.wait_minutes, "starting the MLflow run")
        run_id = run.info.run_id
        self.log = RunLogger(self.uri, self.work_dir, run_id, self.wait_minutes)
        if reopen is None:
            save_state(self.work_dir, RunState("running", run_id, keys.data_hash, keys.config_hash, keys.code, self.fold))
        self.log.start(dict(params), dict(config), dict(artifacts), folds)
        return run_id

    def mark(self, status: str, run_id: str) -> None:
        """Record the run's status in ``state/fold_K.json``.

        Args:
            status: ``running``, ``trained``, ``completed`` or ``failed``.
            run_id: the MLflow run.
        """
        assert self.keys is not None, "decide() first"
        keys = self.keys
        previous = load_state(self.work_dir, self.fold)
        started = previous.started if previous is not None and previous.run_id == run_id else now_iso()
        save_state(self.work_dir, RunState(status, run_id, keys.data_hash, keys.config_hash, keys.code, self.fold,
                                           started, now_iso() if status == "completed" else None))
