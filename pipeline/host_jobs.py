"""The live jobs of this project on one host: a folder with one ``flock``-held file per job.

Jobs nobody declared (a colleague's ``predict`` started while the nightly ``run`` trains, ``pacs watch`` from
cron) find each other here; :mod:`pipeline.cpus` counts them to size each job's threads.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: The folder of live jobs (default: ``unet-pipeline-jobs`` in the temporary folder), one file per job.
JOBS_DIR_ENV = "UNET_PIPELINE_JOBS_DIR"


class HostJobs:
    """The live jobs of this project on this host, one file each in a shared folder.

    A job's file holds its pid, command and CPUs, and the job holds an exclusive ``flock`` on it while it
    lives: the kernel drops the lock when the process ends however it ends, so a file whose lock can be
    taken belongs to a dead job and is removed by whoever finds it. Nothing else (no paths, no data)
    is written. The folder is world-writable with the sticky bit, like ``/tmp``, so jobs of several users
    on one server see each other; where it cannot be used, a job runs as if it were alone.

    Args:
        folder: the folder of live jobs (``UNET_PIPELINE_JOBS_DIR``, else ``unet-pipeline-jobs`` in the
            temporary folder).
        cpus: this job's CPUs (its affinity mask); only jobs sharing one of them count.
    """

    def __init__(self, folder: Path, cpus: set[int]) -> None:
        self.folder = folder
        self.cpus = cpus
        self.path: Path | None = None
        self._handle: Any = None

    def register(self, command: str) -> bool:
        """Add this job; ``False`` (and the job runs as if alone) where the folder cannot be used.

        Args:
            command: the job's command (``run``, ``predict``, ...), for whoever reads the folder.
        """
        import fcntl

        try:
            if not self.folder.is_dir():
                self.folder.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(OSError):  # another user's folder: it is already shared
                    self.folder.chmod(0o1777)
            path = self.folder / f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}.job"
            # Locked and written under another name first: a ``.job`` file whose lock can be taken is stale.
            handle = path.with_suffix(".new").open("w")
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            handle.write(json.dumps({"pid": os.getpid(), "command": command, "cpus": sorted(self.cpus)}))
            handle.flush()
            os.replace(path.with_suffix(".new"), path)
        except OSError:
            return False
        self.path, self._handle = path, handle
        return True

    def others(self) -> int:
        """Live jobs other than this one whose CPUs overlap this job's; stale files are removed on the way."""
        import fcntl

        count = 0
        try:
            entries = [e for e in os.scandir(self.folder) if e.name.endswith(".job")]
        except OSError:
            return 0
        for entry in entries:
            if self.path is not None and entry.name == self.path.name:
                continue
            try:
                with open(entry.path) as handle:
                    try:
                        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError:  # held: the job lives
                        text = handle.read()
                    else:  # its job ended without removing it
                        with contextlib.suppress(OSError):
                            os.unlink(entry.path)
                        continue
            except OSError:
                continue
            try:
                cpus = set(json.loads(text).get("cpus", []))
            except (ValueError, AttributeError):
                cpus = set()  # not ours to read: count it
            if not cpus or cpus & self.cpus:
                count += 1
        return count

    def close(self) -> None:
        """Remove this job's file (also done by the kernel's lock release and the next look, if it is killed)."""
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            with contextlib.suppress(OSError):
                self._handle.close()
            self.path = self._handle = None


def jobs_folder(environ: Mapping[str, str] | None = None) -> Path:
    """The folder of live jobs: ``UNET_PIPELINE_JOBS_DIR``, else ``unet-pipeline-jobs`` in the temporary folder.

    Args:
        environ: the environment (default ``os.environ``).
    """
    environ = os.environ if environ is None else environ
    return Path(environ.get(JOBS_DIR_ENV) or Path(tempfile.gettempdir()) / "unet-pipeline-jobs")
