"""The work-directory locks: one call per fold at a time, one preprocessing at a time, one ``pacs watch``.

Three kinds of lock file, all kernel ``flock`` locks (:func:`work_dir_lock` says why):

* ``work_dir/locks/fold_K.lock``: held by ``run``/``train`` of fold K for the whole call.
  Two calls for the same fold exclude each other (the second exits 3 at once); calls for
  different folds run side by side (a five-fold cross-validation as five jobs).
* ``work_dir/locks/preprocess.lock``: held while one job discovers, fingerprints, plans and
  preprocesses the data and writes ``splits.json``. The other folds' jobs *wait* for it
  (:func:`preprocess_lock`), then find everything cached.
* ``work_dir/locks/mlflow-store.lock``: held while the work directory's own SQLite MLflow
  store is opened (created and migrated on first use), :func:`store_setup_lock`.
* ``work_dir/.lock``: the whole work directory, for commands that are not per fold (``pacs watch``).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import LockHeldError
from pipeline.scheduling.state import now_iso

LOCK_NAME = ".lock"
LOCKS_DIR = "locks"
PREPROCESS_LOCK = "preprocess.lock"
# Preprocessing a large dataset (hundreds of CT volumes) takes hours on a slow share; a waiter gives up after this.
PREPROCESS_WAIT_S = 6 * 3600.0
STORE_SETUP_LOCK = "mlflow-store.lock"
STORE_SETUP_WAIT_S = 600.0
WAIT_POLL_S = 0.5

logger = logging.getLogger(__name__)


def fold_lock_path(work_dir: Path, fold: int) -> Path:
    """The lock file of one fold's ``run``/``train`` calls.

    Args:
        work_dir: the work directory.
        fold: the cross-validation fold.
    """
    return work_dir / LOCKS_DIR / f"fold_{fold}.lock"


def _record(fd: int) -> dict | None:
    """The lock file's JSON record; ``None`` when not (yet, or no longer) written."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _holder(fd: int) -> str:
    """The lock file's record as words for the error message; tolerates a record not yet (or badly) written."""
    record = _record(fd)
    if record is None:
        # The holder takes the lock before it writes its record: we may look in between.
        return "another process (its record is not written yet)"
    return (f"pid {record.get('pid', '?')} on host {record.get('host', '?')} "
            f"(command '{record.get('command', '?')}') since {record.get('started', '?')}")


@contextmanager
def _held(fd: int, command: str, fold: int | None) -> Iterator[None]:
    """Write our record into a lock we hold; empty it and unlock at the end."""
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": now_iso(), "command": command,
              **({"fold": fold} if fold is not None else {})}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    os.fsync(fd)
    try:
        yield
    finally:
        # An empty file reads as "free" to a person looking; a stale record would not.
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


@contextmanager
def work_dir_lock(work_dir: Path, command: str, fold: int | None = None) -> Iterator[Path]:
    """Hold an exclusive lock on the work directory (``fold`` ``None``) or on one fold of it, or exit 3 at once.

    The lock is a kernel ``flock`` on the file, not the file's existence: the kernel
    releases it when the holder's last descriptor closes, which includes the holder
    being killed (SIGKILL, OOM killer, node reboot). A file left behind by a dead
    process therefore blocks nothing; it is simply taken over and rewritten. We
    never judge by the recorded pid: pids are reused, and a pid means nothing on
    another host sharing the directory. The file is never deleted either, since
    deleting a lock file lets two processes lock two different inodes.

    On a shared work directory the lock holds across machines where the file system
    passes ``flock`` to the server: NFS v4 (Linux maps ``flock`` to NFS byte-range
    locks since 2.6.12), and Kubernetes volumes backed by such a server or by CephFS.
    Where it does not, the lock only excludes processes of the same machine: NFS v3
    mounted with ``nolock`` (or ``local_lock=all``) and some FUSE/object-store mounts
    grant every host the lock, so two machines could run the same fold together (the
    per-fold run state and checkpoints would then be written by both). Run one fold
    per work directory there, or mount with locking on.

    While held, the file holds one JSON object: ``pid``, ``host``, ``started`` (ISO
    time, UTC), ``command`` and, for a fold lock, ``fold``. The command is a bare
    word such as ``"run"``, never a path or argument, since those can carry patient
    names into a shared folder. The record is emptied before the lock is released.

    Python opens the descriptor non-inheritable, so a program started with
    ``exec`` does not keep the lock alive; a ``fork``-ed child (e.g. a data-loader
    worker) does share it until it exits.

    Args:
        work_dir: the work directory (created if missing).
        command: a word naming the call, e.g. ``"run"``.
        fold: lock only this fold (``work_dir/locks/fold_K.lock``); ``None``: the whole
            directory (``work_dir/.lock``).

    Raises:
        LockHeldError: another process (or another ``with`` in this one) holds the lock.
            The message names its pid, host and start time, and says this call exits
            without doing anything.

    Yields:
        The lock file's path.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / LOCK_NAME if fold is None else fold_lock_path(work_dir, fold)
    fd = _open(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            what = f"{work_dir}" if fold is None else f"fold {fold} of {work_dir}"
            raise LockHeldError(f"{what} is in use by {_holder(fd)} (lock file {path}); "
                                "this call exits without doing anything") from None
        with _held(fd, command, fold):
            yield path
    finally:
        os.close(fd)


def _waiting_for(fd: int) -> str:
    """Whom a preprocessing waiter waits for, in words (the holder's fold when it said)."""
    record = _record(fd)
    if record is None:
        return "another job"
    who = f"fold {record['fold']}'s job" if record.get("fold") is not None else f"a '{record.get('command', '?')}' call"
    return f"{who} (pid {record.get('pid', '?')} on host {record.get('host', '?')})"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _take_waiting(fd: int, path: Path, timeout_s: float, what: str, level: int = logging.WARNING) -> str | None:
    """Take the lock on ``fd``, polling until ``timeout_s``; whom we waited for (``None``: it was free).

    The waiting line is logged at ``level`` (a warning shows on the console without logging set up).
    """
    deadline = time.monotonic() + timeout_s
    waited_for = None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return waited_for
        except BlockingIOError:
            holder = _waiting_for(fd)
            if time.monotonic() >= deadline:
                raise LockHeldError(f"waited {_duration(timeout_s)} for {holder} to finish {what} (lock file {path}); "
                                    "this call exits without doing anything") from None
            if holder != waited_for:  # one line per holder, not one per poll
                logger.log(level, "waiting for %s to finish %s", holder, what)
                waited_for = holder
            time.sleep(WAIT_POLL_S)


@contextmanager
def preprocess_lock(work_dir: Path, command: str, fold: int | None = None,
                    timeout_s: float = PREPROCESS_WAIT_S) -> Iterator[Path]:
    """Hold ``work_dir/locks/preprocess.lock``, waiting (up to ``timeout_s``) while another job preprocesses.

    One job at a time discovers, fingerprints, plans and preprocesses the data into the
    shared cache; the others wait here, then run the same steps and find every case
    up to date (each case's ``.npz`` is trusted only through ``manifest.json``, written
    after the file's atomic rename, so a job killed mid-way leaves nothing a rerun
    trusts: the next holder redoes what is missing). Waiting polls a non-blocking
    ``flock`` rather than blocking in the kernel, so the timeout is exact and a waiter
    on NFS never hangs in an uninterruptible lock call. A holder that dies releases
    the lock with its descriptors, and the next waiter takes over.

    Args:
        work_dir: the work directory.
        command: a word naming the call, e.g. ``"run"`` (recorded in the lock file).
        fold: this job's fold (recorded, so that waiters can say whom they wait for).
        timeout_s: how long to wait before giving up.

    Raises:
        LockHeldError: still held after ``timeout_s`` (exit 3); the message names the holder.

    Yields:
        The lock file's path.
    """
    path = work_dir / LOCKS_DIR / PREPROCESS_LOCK
    fd = _open(path)
    try:
        started = time.monotonic()
        if _take_waiting(fd, path, timeout_s, "preprocessing") is not None:
            logger.warning("preprocessing lock free after %s; reusing the preprocessed data where it is up to date",
                           _duration(time.monotonic() - started))
        with _held(fd, command, fold):
            yield path
    finally:
        os.close(fd)


@contextmanager
def store_setup_lock(work_dir: Path, command: str, fold: int | None = None,
                     timeout_s: float = STORE_SETUP_WAIT_S) -> Iterator[Path]:
    """Hold ``work_dir/locks/mlflow-store.lock`` while the work directory's SQLite MLflow store is set up.

    MLflow creates (and migrates) a new SQLite store on first use; fold jobs started
    together would run the same schema migrations at once and fail on each other's
    columns. Holding this lock around the first connection makes them take turns.

    Args:
        work_dir: the work directory.
        command: a word naming the call (recorded in the lock file).
        fold: this job's fold (recorded).
        timeout_s: how long to wait before giving up.

    Raises:
        LockHeldError: still held after ``timeout_s`` (exit 3).

    Yields:
        The lock file's path.
    """
    path = work_dir / LOCKS_DIR / STORE_SETUP_LOCK
    fd = _open(path)
    try:
        # Seconds at most, and every job but the first would say it: not worth a console line.
        _take_waiting(fd, path, timeout_s, "setting up the work directory's MLflow store", logging.INFO)
        with _held(fd, command, fold):
            yield path
    finally:
        os.close(fd)
