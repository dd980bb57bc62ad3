"""The work-directory lock: two scheduled calls never work in one work directory at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import LockHeldError
from pipeline.scheduling.state import now_iso

LOCK_NAME = ".lock"


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
