"""Scheduled calls (cron, systemd timers, Kubernetes CronJobs): the work-directory lock and the run state.

A scheduler starts the same command again and again; two calls must never work in one
work directory at once (:func:`work_dir_lock`), and a call must be able to tell what the
last one left behind: a finished run whose inputs are unchanged (skip it), or an
interrupted one (resume it). :class:`RunState` records that, one file per fold.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import InputDataError, LockHeldError
from pipeline.outputs import write_text_atomic

LOCK_NAME = ".lock"
STATE_DIR = "state"
PACKAGE = "unet-pipeline"
Status = Literal["running", "trained", "completed", "failed"]
STATUSES: tuple[str, ...] = ("running", "trained", "completed", "failed")


def now_iso() -> str:
    """The current time as an ISO 8601 string in UTC, to the second."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _holder(fd: int) -> str:
    """The lock file's record as words for the error message; tolerates a record not yet (or badly) written."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict):
        # The holder takes the lock before it writes its record: we may look in between.
        return "another process (its record is not written yet)"
    return (f"pid {record.get('pid', '?')} on host {record.get('host', '?')} "
            f"(command '{record.get('command', '?')}') since {record.get('started', '?')}")


@contextmanager
def work_dir_lock(work_dir: Path, command: str) -> Iterator[Path]:
    """Hold the work directory's exclusive lock (``work_dir/.lock``) for the duration of the block.

    The lock is a kernel ``flock`` on the file, not the file's existence: the kernel
    releases it when the holder's last descriptor closes, which includes the holder
    being killed (SIGKILL, OOM killer, node reboot). A file left behind by a dead
    process therefore blocks nothing; it is simply taken over and rewritten. We
    never judge by the recorded pid: pids are reused, and a pid means nothing on
    another host sharing the directory. The file is never deleted either, since
    deleting a lock file lets two processes lock two different inodes.

    While held, the file holds one JSON object: ``pid``, ``host``, ``started`` (ISO
    time, UTC) and ``command``. The command is a bare word such as ``"run"``, never
    a path or argument, since those can carry patient names into a shared folder.
    The record is emptied before the lock is released.

    Python opens the descriptor non-inheritable, so a program started with
    ``exec`` does not keep the lock alive; a ``fork``-ed child (e.g. a data-loader
    worker) does share it until it exits.

    Args:
        work_dir: the work directory (created if missing).
        command: a word naming the call, e.g. ``"run"``.

    Raises:
        LockHeldError: another process (or another ``with`` in this one) holds the lock.
            The message names its pid, host and start time, and says this call exits
            without doing anything.

    Yields:
        The lock file's path.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeldError(f"{work_dir} is in use by {_holder(fd)} (lock file {path}); "
                                "this call exits without doing anything") from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": now_iso(), "command": command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        try:
            yield path
        finally:
            # An empty file reads as "free" to a person looking; a stale record would not.
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@dataclass
class RunState:
    """What the last call did for one fold: the basis of "skip if unchanged" and automatic resume.

    Args:
        status: ``"running"`` (started, not finished: resume it), ``"trained"`` (training
            done, evaluation/registration not yet), ``"completed"`` or ``"failed"`` (training
            diverged or crashed: the next call starts afresh).
        run_id: the MLflow run.
        data_hash: fingerprint of the input data.
        config_hash: :func:`config_hash` of the resolved configuration.
        code_version: :func:`code_version` of the code that ran.
        fold: the cross-validation fold.
        started: ISO time the run started.
        finished: ISO time it completed, or ``None``.
    """

    status: Status
    run_id: str | None
    data_hash: str
    config_hash: str
    code_version: dict[str, Any] = field(default_factory=dict)
    fold: int = 0
    started: str = field(default_factory=now_iso)
    finished: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, not {self.status!r}")


def state_path(work_dir: Path, fold: int) -> Path:
    """Where a fold's state lives: ``work_dir/state/fold_K.json``.

    Args:
        work_dir: the work directory.
        fold: the cross-validation fold.
    """
    return work_dir / STATE_DIR / f"fold_{fold}.json"


def load_state(work_dir: Path, fold: int) -> RunState | None:
    """The fold's recorded state, or ``None`` when no call has recorded one.

    Args:
        work_dir: the work directory.
        fold: the cross-validation fold.

    Raises:
        InputDataError: the file exists but is not a state record (it names the file,
            which can be deleted to start the fold afresh).
    """
    path = state_path(work_dir, fold)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    known = {f.name for f in fields(RunState)}
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or not {"status", "run_id", "data_hash", "config_hash"} <= data.keys():
            raise ValueError("keys missing")
        # Keys written by a newer version are ignored, so an older one can still read the file.
        return RunState(**{k: v for k, v in data.items() if k in known})
    except (ValueError, TypeError) as exc:
        raise InputDataError(path, f"is not a valid run state ({exc}); delete it to start fold {fold} afresh") from None


def save_state(work_dir: Path, state: RunState) -> Path:
    """Record a fold's state atomically in ``work_dir/state/fold_K.json``.

    Args:
        work_dir: the work directory.
        state: the state; its ``fold`` picks the file.

    Returns:
        The file written.
    """
    path = state_path(work_dir, state.fold)
    write_text_atomic(path, json.dumps(asdict(state), indent=1, sort_keys=True) + "\n")
    return path


def _git(root: Path, *args: str) -> str | None:
    """A git command's stdout, or ``None`` when git is absent, fails or hangs."""
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
            # git status would otherwise refresh .git/index, racing a developer's own git commands.
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version() -> dict[str, Any]:
    """The code that is running: the installed package version and, from a git checkout, its commit.

    The commit is only reported when the package's own source folder is the top of a
    git work tree: an installed copy inside some other repository (a virtualenv in a
    project folder) must not report that project's commit. ``git_dirty`` counts
    changes to tracked files only; stray untracked files are not a code change.

    Local changes count by content: ``git_diff_sha256`` hashes ``git diff HEAD``, so a
    second edit after a run is a code change too.

    Returns:
        ``{"package": version or None, "git_commit": sha or None, "git_dirty": bool or None,
        "git_diff_sha256": sha or None}``; never raises when git or the package metadata is missing.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        package: str | None = version(PACKAGE)
    except PackageNotFoundError:
        package = None
    root = Path(__file__).resolve().parent.parent
    commit = dirty = diff = None
    top = _git(root, "rev-parse", "--show-toplevel")
    if top and Path(top).resolve() == root:
        commit = _git(root, "rev-parse", "HEAD")
        status = _git(root, "status", "--porcelain", "--untracked-files=no")
        dirty = None if status is None else bool(status)
        if dirty:
            text = _git(root, "diff", "HEAD")
            diff = hashlib.sha256(text.encode()).hexdigest() if text is not None else None
    return {"package": package, "git_commit": commit, "git_dirty": dirty, "git_diff_sha256": diff}


def config_hash(cfg: Mapping[str, Any]) -> str:
    """SHA-256 of the configuration as canonical JSON (sorted keys, no whitespace), hex.

    Key order and formatting do not change the hash; any value does. Values JSON
    cannot hold (paths) are hashed as their ``str``.

    Args:
        cfg: the resolved configuration as a plain mapping.
    """
    canonical = json.dumps(cfg, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


Action = Literal["up_to_date", "resume", "finish", "fresh"]


def decide_run(state: RunState | None, data_hash: str, config_hash_: str, code: Mapping[str, Any], force: bool,
               last_checkpoint_run: str | None) -> Action:
    """What a plain ``run`` call does, from what the last call of this fold left behind.

    * ``up_to_date``: the last run completed with the same data, config and code: nothing to do.
    * ``resume``: the last run was interrupted while training (same inputs): continue it, same MLflow run.
    * ``finish``: the last run finished training but not evaluation/registration (e.g. the tracking
      server went away at the end): do the rest, same MLflow run.
    * ``fresh``: anything else, or ``force``: a new run from scratch.

    Args:
        state: the fold's saved state, if any.
        data_hash: the dataset's content hash now.
        config_hash_: the configuration's hash now.
        code: :func:`code_version` now.
        force: ``--force`` (retrain even if up to date).
        last_checkpoint_run: the MLflow run id stored in the fold's ``last.pt``, if any.
    """
    if state is None or force or state.status == "failed":
        return "fresh"
    same = (state.data_hash, state.config_hash, dict(state.code_version)) == (data_hash, config_hash_, dict(code))
    if not same:
        return "fresh"
    if state.status == "completed":
        return "up_to_date"
    if state.status == "trained":
        return "finish"
    return "resume" if last_checkpoint_run is not None and last_checkpoint_run == state.run_id else "fresh"


@dataclass
class RunKeys:
    """What decides whether a run is up to date: the data's content, the config, the code.

    Args:
        data_hash: the dataset's content hash.
        config_hash: hash of the resolved configuration.
        code: package version, git commit and dirty flag.
    """

    data_hash: str
    config_hash: str
    code: dict[str, Any]


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
        from pipeline import registry, tracking

        self.uri = registry.tracking_uri(self.configured_uri, self.work_dir)
        tracking.connect(self.uri, self.work_dir)
        registry.setup(self.configured_uri, self.work_dir, self.experiment)

    def decide(self, config: Mapping[str, Any], data_hash: str, last_checkpoint: Path) -> tuple[str, RunKeys, Any]:
        """What this call does (:func:`decide_run`), with the keys it compared and the state it read.

        Args:
            config: the resolved configuration.
            data_hash: the dataset's content hash.
            last_checkpoint: the fold's ``last.pt`` (its MLflow run id tells whether it can be resumed).
        """
        from pipeline.checkpoints import load_checkpoint

        self.keys = keys = RunKeys(data_hash, config_hash(config), code_version())
        state = load_state(self.work_dir, self.fold)
        # Only an interrupted run needs to know whose last.pt is there (reading it loads the optimizer state too).
        last_run = None
        if state is not None and state.status == "running" and last_checkpoint.is_file():
            last_run = load_checkpoint(last_checkpoint).get("mlflow_run_id")
        return decide_run(state, keys.data_hash, keys.config_hash, keys.code, self.force, last_run), keys, state

    def open_run(self, action: str, state: RunState | None, params: Mapping[str, Any], config: Mapping[str, Any],
                 artifacts: Mapping[str, Path], folds: Any) -> str:
        """Start a new MLflow run, or reopen the interrupted one; log its parameters.

        Args:
            action: what :meth:`decide` decided.
            state: the state it read.
            params: the run's MLflow params.
            config: the resolved configuration, without paths.
            artifacts: files to log, by folder.
            folds: the stored split.
        """
        import mlflow

        from pipeline import tracking

        assert self.keys is not None, "decide() first"
        keys = self.keys
        reopen = state.run_id if action in ("resume", "finish") and state is not None else None
        if reopen is None and state is not None and state.status in ("running", "trained") and state.run_id:
            # An interrupted run of other inputs is not going to be finished: say so in MLflow.
            with suppress(Exception):
                mlflow.MlflowClient().set_terminated(state.run_id, "KILLED")
        run = tracking.when_reachable(
            lambda: mlflow.start_run(run_id=reopen, tags=None if reopen else {"data.fold": str(self.fold)}),
            self.uri, self.wait_minutes, "starting the MLflow run")
        run_id = run.info.run_id
        self.log = tracking.RunLogger(self.uri, self.work_dir, run_id, self.wait_minutes)
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
