"""The metrics outbox on disk: one run's JSONL file, its rejected file and the lock over both.

Each line is one batch: ``{"step", "timestamp", "metrics"}``, strict JSON (NaN and
infinities written as strings). Appends are fsync-ed; rewrites are atomic. A line
that cannot be read back, or a batch MLflow refused for good, moves to
``<run_id>.rejected.jsonl`` with its reason. Sending is :mod:`pipeline.registry.outbox`'s job.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.data import write_text_atomic

OUTBOX_DIR = "mlflow-outbox"


REJECTED_SUFFIX = ".rejected.jsonl"


_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


# The outbox's logger, not this module's: its warnings keep the name they have always been logged under.
logger = logging.getLogger("pipeline.registry.outbox")


def encode_value(value: float) -> float | str:
    """Finite floats as numbers; NaN/inf as strings, so every line stays strict JSON.

    Args:
        value: a metric value.
    """
    return value if math.isfinite(value) else ("NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity"))


def decode_value(value: float | str) -> float:
    """The metric value :func:`encode_value` wrote; raises ``KeyError`` for a string it never writes.

    Args:
        value: a value read back from a line.
    """
    return _NON_FINITE[value] if isinstance(value, str) else float(value)


class OutboxFile:
    """One run's outbox file and rejected file; every method but :meth:`locked` expects the caller to hold the lock.

    Args:
        folder: the outbox folder (``work_dir/mlflow-outbox``).
        run_id: the MLflow run; the files are ``<run_id>.jsonl`` and ``<run_id>.rejected.jsonl``.
    """

    def __init__(self, folder: Path, run_id: str) -> None:
        self.run_id = run_id
        self.folder = folder
        self.path = folder / f"{run_id}.jsonl"
        self.rejected_path = folder / f"{run_id}{REJECTED_SUFFIX}"

    @contextmanager
    def locked(self) -> Iterator[None]:
        """An exclusive ``flock`` on the outbox folder: one writer or flusher at a time, across threads and processes."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def read(self) -> list[dict[str, Any]]:
        """The outbox's readable lines in order; unreadable ones go to the rejected file."""
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return []
        records, bad = [], 0
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                metrics = record["metrics"]
                # Checked here, not when sending: a bad value would otherwise fail every flush and block the queue.
                if not isinstance(metrics, dict) or not all(isinstance(k, str) for k in metrics):
                    raise ValueError("no metrics")
                for value in metrics.values():
                    decode_value(value)
                records.append({"step": int(record["step"]), "timestamp": int(record["timestamp"]), "metrics": metrics})
            except (ValueError, KeyError, TypeError, AttributeError):
                bad += 1
                self.reject_line(line, "unreadable outbox line (a torn write or a bad value)")
        if bad:
            self.rewrite(records)
        return records

    def append(self, record: dict[str, Any]) -> None:
        """One JSON line, appended and fsync-ed before returning: the batch is on disk once we say so.

        Args:
            record: the batch, its values already encoded (:func:`encode_value`).
        """
        line = json.dumps(record, allow_nan=False) + "\n"
        with self.path.open("a+b") as f:
            # A crash mid-write can leave a last line without its newline: do not glue onto it.
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        """Replace the outbox by ``records`` atomically (remove it when empty).

        Args:
            records: the lines to keep, in order.
        """
        if not records:
            self.path.unlink(missing_ok=True)
            return
        write_text_atomic(self.path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in records))

    def reject(self, records: list[dict[str, Any]], reason: str) -> None:
        """Keep batches MLflow refused for good in the rejected file, each logged as a warning.

        Args:
            records: the refused batches.
            reason: the server's reason.
        """
        for record in records:
            self.reject_line(json.dumps(record, allow_nan=False), reason)

    def reject_line(self, line: str, reason: str) -> None:
        """Append one line with its reason to the rejected file (fsync-ed) and log a warning.

        Args:
            line: the line as it was, or would be, in the outbox.
            reason: why it cannot be sent.
        """
        entry = json.dumps({"reason": reason, "line": line})
        with self.rejected_path.open("a") as f:
            f.write(entry + "\n")
            f.flush()
            os.fsync(f.fileno())
        logger.warning("MLflow run %s: a metrics batch was refused (%s); kept in %s", self.run_id, reason,
                       self.rejected_path)
