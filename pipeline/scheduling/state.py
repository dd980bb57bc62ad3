"""The run state a scheduled call leaves behind: finished with unchanged inputs (skip), or interrupted (resume).

A scheduler starts the same command again and again; a call must be able to tell what
the last one left behind. :class:`RunState` records that, one file per fold.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pipeline.data import write_text_atomic
from pipeline.errors import InputDataError

STATE_DIR = "state"


PACKAGE = "unet-pipeline"


Status = Literal["running", "trained", "completed", "failed"]


STATUSES: tuple[str, ...] = ("running", "trained", "completed", "failed")


def now_iso() -> str:
    """The current time as an ISO 8601 string in UTC, to the second."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


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
    root = Path(__file__).resolve().parents[2]  # pipeline/scheduling/state.py -> the project root
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
