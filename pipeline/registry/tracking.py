"""The MLflow side of a ``run``/``train`` call: a server checked before any work, an outage survived.

* At start, an HTTP(S) tracking server that does not answer ends the call before
  preprocessing, with one line and exit code 5 (:func:`connect`). Metrics a previous
  call could not send are sent first.
* During training, per-epoch metrics go through :class:`~pipeline.registry.outbox.MetricsOutbox`:
  when the server is gone they are kept on disk in the work directory and sent,
  in order and with their original steps and times, as soon as it answers again.
  Training never waits for the server.
* At the end, every remaining MLflow call (metrics, artifacts, the model, the registry)
  goes through :func:`when_reachable`, which waits for the server up to
  ``mlflow.outage_wait_minutes`` and then gives up with exit code 5; the run's state
  says "trained", so the next call finishes it (same MLflow run) instead of training again.

MLflow's own HTTP retries (7, with a backoff factor of 2: minutes per call) are
shortened for this process, unless the user set them, so that an outage is seen in
seconds and handled here.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pipeline.errors import TrackingUnavailableError
from pipeline.registry.outbox import flush_all
from pipeline.registry.server import check_tracking_server, redact_uri

logger = logging.getLogger(__name__)
T = TypeVar("T")

_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def metric_name(label: str) -> str:
    """A label name as MLflow accepts it in a metric or tag key (other characters become ``_``).

    Args:
        label: a label name, e.g. ``"posterior hippocampus"``.
    """
    return re.sub(r"[^A-Za-z0-9_.\-/ ]", "_", label).replace(" ", "_")


def shorten_http_retries() -> None:
    """Use short MLflow HTTP retries in this process (unless the user set them): outages are handled here."""
    for name, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def connect(uri: str, work_dir: Path) -> None:
    """Fail fast when the tracking server is unreachable; then send what earlier calls kept on disk.

    Args:
        uri: the tracking URI.
        work_dir: the work directory (its ``mlflow-outbox/``).
    """
    shorten_http_retries()
    check_tracking_server(uri)
    sent = flush_all(work_dir, uri)
    if any(sent.values()):
        logger.warning("sent %d metric values an earlier call kept while the tracking server was away",
                       sum(sent.values()))


def when_reachable(action: Callable[[], T], uri: str, wait_minutes: float, what: str) -> T:
    """Run ``action`` (an MLflow call that is safe to repeat); while the server is away, wait and retry.

    A failure while the server answers (a real error) is raised at once. A failure
    while it does not answer is retried with growing pauses until ``wait_minutes``;
    then :class:`TrackingUnavailableError` ends the call.

    Args:
        action: the MLflow call(s).
        uri: the tracking URI.
        wait_minutes: how long to wait for the server.
        what: what is being done, for the messages.
    """
    deadline = time.monotonic() + wait_minutes * 60
    pause = 2.0
    warned = False
    while True:
        try:
            return action()
        except Exception:
            try:
                check_tracking_server(uri)
            except TrackingUnavailableError as down:
                if time.monotonic() + pause > deadline:
                    raise TrackingUnavailableError(
                        f"{down}; gave up {what} after waiting {wait_minutes:g} min. Everything is kept in the work "
                        "directory: the next call sends it and finishes this run"
                    ) from None
                if not warned:
                    logger.warning("MLflow tracking server %s is away while %s; waiting up to %g min",
                               redact_uri(uri), what, wait_minutes)
                    warned = True
                time.sleep(pause)
                pause = min(pause * 2, 30.0)
                continue
            raise


class RunLogger:
    """Everything one ``run``/``train`` call logs to its MLflow run, privacy-safe and outage-proof.

    Per-epoch metrics go through the on-disk outbox (training never waits); all other
    calls wait for the server through :func:`when_reachable`. Case ids become
    pseudonyms and paths never leave the work directory (see :mod:`pipeline.registry.privacy`).

    Args:
        uri: the tracking URI.
        work_dir: the work directory.
        run_id: the active MLflow run.
        wait_minutes: ``mlflow.outage_wait_minutes``.
    """

    def __init__(self, uri: str, work_dir: Path, run_id: str, wait_minutes: float) -> None:
        from pipeline.registry.outbox import MetricsOutbox
        from pipeline.registry.privacy import CaseAliases

        self.uri, self.work_dir, self.run_id, self.wait = uri, work_dir, run_id, wait_minutes
        self.outbox = MetricsOutbox(work_dir, run_id, uri)
        self.alias = CaseAliases(work_dir)

    def call(self, action: Callable[[], T], what: str) -> T:
        """Run an MLflow call, waiting for the server while it is away.

        Args:
            action: the call (safe to repeat).
            what: what it does, for the messages.
        """
        return when_reachable(action, self.uri, self.wait, what)

    def epoch_metrics(self, history: Path) -> Callable[[dict[str, float], int], None]:
        """The training loop's per-epoch logger: the outbox, plus a local history for the curves.

        Args:
            history: the fold's ``history.jsonl`` (kept across resumes).
        """
        import json

        def log(metrics: dict[str, float], step: int) -> None:
            history.parent.mkdir(parents=True, exist_ok=True)
            with history.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
            self.outbox.log_metrics(metrics, step)

        return log

    def start(self, params: dict[str, Any], config: dict[str, Any], artifacts: dict[str, Path],
              folds: list[dict[str, list[str]]]) -> None:
        """Log the run's parameters (those not logged yet), its redacted config, plan and pseudonymised split.

        Args:
            params: flat parameters (already path-free).
            config: the redacted resolved config.
            artifacts: artifact folder -> local file (plans, fingerprint).
            folds: the cross-validation folds (case ids; pseudonymised here).
        """
        import mlflow
        import yaml

        def log() -> None:
            logged = mlflow.get_run(self.run_id).data.params
            mlflow.log_params({k: v for k, v in params.items() if k not in logged})
            mlflow.log_text(yaml.safe_dump(config, sort_keys=False), "config/resolved.yaml")
            for folder, path in artifacts.items():
                mlflow.log_artifact(str(path), folder)
            mlflow.log_dict({"folds": self.alias.splits(folds)}, "preprocess/splits.json")

        self.call(log, "logging the run's parameters")

    def dataset_input(self, labels: dict[str, Any]) -> None:
        """Log the DICOM label set as the run's training input (source without credentials, digest of the label set).

        Args:
            labels: :func:`pipeline.data.label_summary` of the dataset's manifest.
        """
        import mlflow
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.http_dataset_source import HTTPDatasetSource
        from mlflow.data.meta_dataset import MetaDataset

        source = labels["source"]
        origin = HTTPDatasetSource(source) if "://" in source else CodeDatasetSource({"source": source})
        dataset = MetaDataset(origin, name="dicom-labels", digest=labels["digest"])
        self.call(lambda: mlflow.log_input(dataset, context="training"), "logging the dataset input")

    def metrics(self, values: dict[str, float], what: str = "logging metrics") -> None:
        """Log final (non-epoch) metrics.

        Args:
            values: metric name -> value.
            what: what they are, for the messages.
        """
        import mlflow

        self.call(lambda: mlflow.log_metrics(values), what)

    def tags(self, values: dict[str, str]) -> None:
        """Set run tags.

        Args:
            values: tag -> value.
        """
        import mlflow

        self.call(lambda: mlflow.set_tags(values), "tagging the run")

    def evaluation(self, result: Any, label_names: list[str], folder: str = "evaluation") -> None:
        """Log an evaluation: summary, pseudonymised per-case table, QC pictures (named by pseudonym).

        Args:
            result: the :class:`~pipeline.evaluation.EvaluationResult`.
            label_names: foreground label names in column order.
            folder: the artifact folder.
        """
        import mlflow

        from pipeline.evaluation import SURFACE_METRICS, case_columns, csv_text

        columns = case_columns(label_names, SURFACE_METRICS)

        def log() -> None:
            mlflow.log_dict(result.summary, f"{folder}/summary.json")
            mlflow.log_text(csv_text(self.alias.rows(result.rows), columns), f"{folder}/cases.csv")
            mlflow.log_dict(result.postprocessing.to_dict(), f"{folder}/postprocessing.json")
            for case_id, png in result.qc_images.items():
                self._log_as(png, case_id)
            # The calibration of the quality estimate: a picture without case names, and its figures.
            calibration = getattr(result, "calibration", None)
            if calibration is not None and calibration.labels:
                mlflow.log_dict(calibration.to_dict(), f"{folder}/quality_calibration.json")
                picture = getattr(result, "calibration_plot", None)
                if picture is not None and Path(picture).is_file():
                    mlflow.log_artifact(str(picture), folder)

        self.call(log, "logging the evaluation")

    def _log_as(self, png: Path, case_id: str) -> None:
        import shutil
        import tempfile

        import mlflow

        with tempfile.TemporaryDirectory(prefix="unet-qc-") as tmp:
            target = Path(tmp) / f"{self.alias(case_id)}.png"
            shutil.copyfile(png, target)
            mlflow.log_artifact(str(target), "qc")

    def curves(self, history: Path, label_names: Mapping[str, str] | None = None) -> Path | None:
        """Draw the training curves from the local history and log them (``plots/training_curves.png``).

        Args:
            history: the fold's ``history.jsonl``.
            label_names: label value -> class name (the plan's ``labels``), for the validation lines' legend.
        """
        import json

        import mlflow

        from pipeline.evaluation import training_curves

        if not history.is_file():
            return None
        by_step: dict[int, dict[str, float]] = {}
        for line in history.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                by_step[int(record.pop("step"))] = record  # an epoch redone after a resume replaces its first try
        series: dict[str, list[tuple[int, float]]] = {}
        for step in sorted(by_step):
            for name, value in by_step[step].items():
                series.setdefault(name, []).append((step, float(value)))
        png = training_curves(series, history.with_name("training_curves.png"), label_names)
        self.call(lambda: mlflow.log_artifact(str(png), "plots"), "logging the training curves")
        return png

    def flush(self) -> None:
        """Send every metric still in the outbox; wait for the server while it is away."""

        def send() -> None:
            self.outbox.flush()
            if self.outbox.pending():
                raise RuntimeError(f"{self.outbox.pending()} metric values still waiting")

        self.call(send, "sending the metrics kept during the outage")

    def end(self, status: str = "FINISHED") -> None:
        """End the MLflow run.

        Args:
            status: ``FINISHED``, ``FAILED`` or ``KILLED``.
        """
        import mlflow

        self.call(lambda: mlflow.end_run(status), "ending the run")
