"""Metrics that survive a tracking-server outage: an on-disk outbox in front of MLflow.

MLflow logs synchronously and has no offline buffer: with its default HTTP policy a
lost server stalls each ``log_metrics`` for minutes of retries and then raises, which
kills a training that itself was fine. :class:`MetricsOutbox` sends each batch with a
short timeout and few retries; a batch that cannot be sent is appended to
``work_dir/mlflow-outbox/<run_id>.jsonl`` and sent, in order, before the next batch or
by :func:`flush_all` at the next call.

Nothing is dropped silently. Every batch ends in exactly one of three places:

* the tracking server (``log_metrics`` returned ``True``, or a later flush sent it);
* the outbox file (a connection failure, timeout, HTTP 5xx/429, expired credentials:
  anything that may work later); it stays there until the server accepts it;
* ``<run_id>.rejected.jsonl`` beside it, with the server's reason, logged as a warning:
  only when MLflow itself refused the data for good (an unknown or deleted run, an
  invalid metric), or a line of the outbox cannot be read back (a torn write).
  Retrying those would fail forever and block every batch behind them.

Batches are re-sent with their original timestamps and steps. MLflow's SQL stores
treat a metric with the same key, value, step and timestamp as the same row, so a
batch that did arrive but whose answer was lost is not stored twice when re-sent.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.registry.outbox_file import OUTBOX_DIR, REJECTED_SUFFIX, OutboxFile, decode_value, encode_value

MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch request


# Only MLflow itself (a store, or a server's JSON error) raises these; a proxy's bare HTTP status maps to others.
_PERMANENT_ERRORS = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"})


_ENV_LOCK = threading.Lock()


logger = logging.getLogger(__name__)


class _Rejected(Exception):
    """MLflow refused a batch for good: re-sending it cannot succeed."""


@contextmanager
def _http_policy(timeout_s: float, max_retries: int, backoff_factor: int) -> Iterator[None]:
    """Set MLflow's HTTP retry/timeout variables for one call only, then restore them exactly.

    MLflow 3 reads ``MLFLOW_HTTP_REQUEST_*`` at every request (``rest_utils.http_request``),
    and caches one HTTP session per distinct retry policy, so changing them around a call
    changes that call alone and never disturbs the sessions other calls use. The variables
    are process-wide: a lock keeps two outboxes from interleaving their changes, and
    another thread's MLflow call made at that very moment would also get the short policy.
    """
    values = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout_s))),  # MLflow parses it as an int
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(max_retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(backoff_factor),
    }
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for key, old in saved.items():
                if old is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = old


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def _chunks(records: list[dict[str, Any]]) -> Iterator[tuple[list[tuple[int, dict[str, Any]]], int]]:
    """Requests of at most 1000 metrics as ``(line index, line or piece of it)``, each with the lines done after it."""
    chunk: list[tuple[int, dict[str, Any]]] = []
    size = 0
    for i, record in enumerate(records):
        items = list(record["metrics"].items())
        if size + len(items) > MAX_METRICS_PER_BATCH and chunk:
            yield chunk, i
            chunk, size = [], 0
        # A line too big for one request is split; the line is done after its last piece.
        while len(items) > MAX_METRICS_PER_BATCH:
            piece, items = items[:MAX_METRICS_PER_BATCH], items[MAX_METRICS_PER_BATCH:]
            yield [(i, {**record, "metrics": dict(piece)})], i
        chunk.append((i, {**record, "metrics": dict(items)}))
        size += len(items)
    if chunk:
        yield chunk, len(records)


class MetricsOutbox:
    """Log one run's metrics to MLflow, keeping on disk (:class:`OutboxFile`) whatever the server cannot take now.

    Args:
        work_dir: the work directory; the outbox is ``work_dir/mlflow-outbox/<run_id>.jsonl``.
        run_id: the MLflow run the metrics belong to.
        tracking_uri: the tracking URI; ``None`` uses MLflow's current one.
        timeout_s: seconds to wait for the server per request attempt.
        max_retries: MLflow's HTTP retries per call (connection errors and 429/5xx answers).
        backoff_factor: MLflow's retry backoff factor (urllib3: the first retry is immediate,
            then ``factor * 2**n`` seconds).
    """

    def __init__(self, work_dir: Path, run_id: str, tracking_uri: str | None = None, *, timeout_s: float = 5,
                 max_retries: int = 2, backoff_factor: int = 1) -> None:
        from mlflow import MlflowClient

        self.run_id = run_id
        self._file = OutboxFile(work_dir / OUTBOX_DIR, run_id)
        # Callers (and the tests) read the outbox's paths here.
        self.folder, self.path, self.rejected_path = self._file.folder, self._file.path, self._file.rejected_path
        self._client = MlflowClient(tracking_uri)
        self._policy = (timeout_s, max_retries, backoff_factor)
        self._offline = False

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> bool:
        """Send one step's metrics, after everything still waiting in the outbox.

        The timestamp is taken now and kept, so a batch sent late still says when it
        was measured.

        Args:
            metrics: metric name -> value.
            step: the step (epoch) they belong to.

        Returns:
            ``True`` when the server stored them; ``False`` when they were kept on disk
            (in the outbox, or in the rejected file if MLflow refused them for good).
        """
        if not metrics:
            return True
        record = {"step": int(step), "timestamp": int(time.time() * 1000),
                  "metrics": {str(k): encode_value(float(v)) for k, v in metrics.items()}}
        with self._file.locked():
            if self._file.path.exists():
                self._flush_locked()
                if self._file.path.exists():
                    # Older batches are still waiting: this one queues behind them, keeping the order.
                    self._file.append(record)
                    return False
            try:
                self._send([record])
            except _Rejected as exc:
                self._file.reject([record], str(exc))
                return False
            except Exception as exc:  # whatever the cause, the batch must reach the disk
                self._went_offline(exc)
                self._file.append(record)
                return False
            self._back_online(0)
            return True

    def flush(self) -> int:
        """Send everything waiting in the outbox, oldest first.

        Lines are grouped into requests of at most 1000 metrics, each metric with its
        original step and timestamp. Lines the server accepted leave the file (the file
        is removed when empty); on a connection failure the rest stays for next time.

        Returns:
            The number of metric values the server accepted.
        """
        with self._file.locked():
            return self._flush_locked()

    def pending(self) -> int:
        """The number of metric values waiting in the outbox."""
        with self._file.locked():
            return sum(len(r["metrics"]) for r in self._file.read())

    # -- internals (the caller holds the folder lock) --

    def _send(self, records: list[dict[str, Any]]) -> None:
        """One ``log_batch`` call; raises :class:`_Rejected` when MLflow refused the data for good."""
        from mlflow.entities import Metric
        from mlflow.exceptions import MlflowException

        metrics = [Metric(key, decode_value(value), r["timestamp"], r["step"])
                   for r in records for key, value in r["metrics"].items()]
        try:
            with _http_policy(*self._policy):
                self._client.log_batch(self.run_id, metrics=metrics)
        except MlflowException as exc:
            if exc.error_code in _PERMANENT_ERRORS:
                raise _Rejected(f"{exc.error_code}: {_first_line(exc)}") from exc
            raise

    def _flush_locked(self) -> int:
        records = self._file.read()
        sent = done = 0
        rejected: set[int] = set()
        failure: Exception | None = None
        for chunk, lines_done in _chunks(records):
            try:
                self._send([piece for _, piece in chunk])
                sent += sum(len(piece["metrics"]) for _, piece in chunk)
            except _Rejected:
                # One bad line must not take its neighbours along: retry them one by one.
                for i, piece in chunk:
                    try:
                        self._send([piece])
                        sent += len(piece["metrics"])
                    except _Rejected as exc:
                        self._file.reject([piece], str(exc))
                        rejected.add(i)
                    except Exception as exc:  # a connection failure half-way: stop here
                        failure = exc
                        break
            except Exception as exc:  # a connection failure, a timeout, a 5xx...: anything that may work later
                failure = exc
            if failure is not None:
                break
            done = lines_done
        # A line only partly sent stays whole: re-sending its metrics with their timestamps stores nothing twice.
        self._file.rewrite([r for i, r in enumerate(records) if i >= done and i not in rejected])
        if failure is not None:
            self._went_offline(failure)
        else:
            self._back_online(sent)
        return sent

    def _went_offline(self, exc: BaseException) -> None:
        if not self._offline:
            logger.warning("MLflow tracking server unreachable (%s); metrics are kept in %s until it answers",
                           _first_line(exc), self._file.path)
        self._offline = True

    def _back_online(self, sent: int) -> None:
        if self._offline:
            logger.warning("MLflow tracking server answers again; %d buffered metric values sent", sent)
        elif sent:
            logger.info("%d buffered metric values sent to MLflow run %s", sent, self.run_id)
        self._offline = False


def flush_all(work_dir: Path, tracking_uri: str | None = None) -> dict[str, int]:
    """Send every run's waiting metrics (at the start of the next call, say). What cannot be sent stays.

    Args:
        work_dir: the work directory holding ``mlflow-outbox/``.
        tracking_uri: the tracking URI; ``None`` uses MLflow's current one.

    Returns:
        Run id -> metric values sent, for every run that had an outbox.
    """
    folder = work_dir / OUTBOX_DIR
    if not folder.is_dir():
        return {}
    runs = sorted(p.name[: -len(".jsonl")] for p in folder.glob("*.jsonl") if not p.name.endswith(REJECTED_SUFFIX))
    return {run_id: MetricsOutbox(work_dir, run_id, tracking_uri).flush() for run_id in runs}
