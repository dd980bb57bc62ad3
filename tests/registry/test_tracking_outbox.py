"""The metrics outbox and the reachability check, against a real ``mlflow server`` that is stopped and restarted."""

from __future__ import annotations

import http.server
import json
import math
import os
import socket
import threading
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.errors import EXIT_TRACKING_UNAVAILABLE, TrackingUnavailableError
from pipeline.registry.outbox import MetricsOutbox, flush_all
from pipeline.registry.server import check_tracking_server, redact_uri
from tests.mlflow_server import MlflowServer, free_port, mlflow_server  # noqa: F401

# MLflow's own default (7 retries, backoff factor 2, 120 s per attempt) waits minutes on a dead server; the
# outbox's policy (MetricsOutbox's defaults) must be what its calls get, and nothing else.
OUTBOX_POLICY = {"max_retries": 2, "backoff_factor": 1, "timeout": 5}


def _record_policies(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """The retry policy and timeout of each HTTP call MLflow makes from now on (recorded, then made as usual)."""
    from mlflow.utils import rest_utils

    seen: list[dict] = []
    real = rest_utils._get_http_response_with_retries

    def recording(method, url, max_retries, backoff_factor, *args, **kwargs):
        seen.append({"max_retries": max_retries, "backoff_factor": backoff_factor, "timeout": kwargs.get("timeout")})
        return real(method, url, max_retries, backoff_factor, *args, **kwargs)

    monkeypatch.setattr(rest_utils, "_get_http_response_with_retries", recording)
    return seen


def _new_run(uri: str) -> str:
    client = MlflowClient(uri)
    experiment = client.create_experiment(f"outbox-{uuid.uuid4().hex[:8]}")
    return client.create_run(experiment).info.run_id


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float, int]]:
    return sorted((m.step, m.value, m.timestamp) for m in MlflowClient(uri).get_metric_history(run_id, key))


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _offline_outbox(work_dir: Path, run_id: str) -> MetricsOutbox:
    """An outbox whose server is a closed port (no retries: it only fills the file, fast)."""
    return MetricsOutbox(work_dir, run_id, f"http://127.0.0.1:{free_port()}", max_retries=0)


def _values(step: int) -> dict[str, float]:
    return {"train_loss": 1.0 / step, "val_dice": step / 100}


@pytest.mark.slow
def test_metrics_logged_during_an_outage_arrive_once_after_restart(mlflow_server: MlflowServer,  # noqa: F811
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow_server.start()
    run_id = _new_run(mlflow_server.uri)
    outbox = MetricsOutbox(tmp_path, run_id, mlflow_server.uri)
    for step in (1, 2, 3):
        assert outbox.log_metrics(_values(step), step) is True
    assert outbox.pending() == 0 and not outbox.path.exists()
    check_tracking_server(mlflow_server.uri)  # up: no error

    mlflow_server.stop()
    with pytest.raises(TrackingUnavailableError, match="connection refused") as info:
        check_tracking_server(mlflow_server.uri)
    assert mlflow_server.uri in str(info.value)
    policies = _record_policies(monkeypatch)
    for step in (4, 5, 6):
        assert outbox.log_metrics(_values(step), step) is False
    # Each call while down tried once under the outbox's short policy, never under MLflow's minutes-long default.
    assert policies == [OUTBOX_POLICY] * 3
    buffered = _lines(outbox.path)
    assert [line["step"] for line in buffered] == [4, 5, 6]
    assert outbox.pending() == 6
    assert outbox.flush() == 0  # still down: nothing sent, nothing lost
    assert _lines(outbox.path) == buffered

    mlflow_server.start()
    assert outbox.log_metrics(_values(7), 7) is True  # flushes 4..6 first, then sends 7
    assert outbox.pending() == 0 and not outbox.path.exists()
    for key in ("train_loss", "val_dice"):
        history = _history(mlflow_server.uri, run_id, key)
        assert [(s, v) for s, v, _ in history] == [(s, _values(s)[key]) for s in range(1, 8)]
        # Buffered values keep the time they were measured, not the time they were sent.
        assert [t for s, _, t in history if 4 <= s <= 6] == [line["timestamp"] for line in buffered]


@pytest.mark.slow
def test_flush_all_at_the_next_call_and_resending_stores_nothing_twice(mlflow_server: MlflowServer,  # noqa: F811
                                                                       tmp_path: Path) -> None:
    mlflow_server.start()
    run_id = _new_run(mlflow_server.uri)
    offline = _offline_outbox(tmp_path, run_id)
    for step in range(1, 5):
        assert offline.log_metrics({**_values(step), "grad_norm": float("nan")}, step) is False
    saved = offline.path.read_text()

    assert flush_all(tmp_path, mlflow_server.uri) == {run_id: 12}
    assert not offline.path.exists()
    # A batch that arrived but whose answer was lost is sent again: it must not be stored twice.
    offline.path.write_text(saved)
    assert flush_all(tmp_path, mlflow_server.uri) == {run_id: 12}
    for key in ("train_loss", "val_dice", "grad_norm"):
        assert [s for s, _, _ in _history(mlflow_server.uri, run_id, key)] == [1, 2, 3, 4]
    assert all(math.isnan(v) for _, v, _ in _history(mlflow_server.uri, run_id, "grad_norm"))
    assert flush_all(tmp_path, mlflow_server.uri) == {}


@pytest.mark.slow
def test_large_batches_are_split_to_mlflow_limit(mlflow_server: MlflowServer, tmp_path: Path) -> None:  # noqa: F811
    mlflow_server.start()
    run_id = _new_run(mlflow_server.uri)
    offline = _offline_outbox(tmp_path, run_id)
    # One line beyond the 1000-metric request limit, then small lines that must pack together.
    assert offline.log_metrics({f"m{i:04d}": float(i) for i in range(2300)}, 1) is False
    for step in range(2, 12):
        assert offline.log_metrics({f"m{i:04d}": float(i * step) for i in range(150)}, step) is False
    assert offline.pending() == 2300 + 10 * 150

    assert MetricsOutbox(tmp_path, run_id, mlflow_server.uri).flush() == 2300 + 10 * 150
    client = MlflowClient(mlflow_server.uri)
    latest = client.get_run(run_id).data.metrics
    assert len(latest) == 2300
    assert latest["m2299"] == 2299.0 and latest["m0149"] == 149.0 * 11
    assert [m.step for m in sorted(client.get_metric_history(run_id, "m0003"), key=lambda m: m.step)] == list(range(1, 12))


@pytest.mark.slow
def test_refused_batch_is_kept_aside_and_does_not_block(mlflow_server: MlflowServer, tmp_path: Path) -> None:  # noqa: F811
    mlflow_server.start()
    run_id = _new_run(mlflow_server.uri)
    offline = _offline_outbox(tmp_path, run_id)
    offline.log_metrics({"val_dice": 0.1}, 1)
    offline.log_metrics({"bad key!": 0.2}, 2)  # MLflow refuses this name: retrying can never succeed
    offline.log_metrics({"val_dice": 0.3}, 3)

    outbox = MetricsOutbox(tmp_path, run_id, mlflow_server.uri)
    assert outbox.flush() == 2
    assert not outbox.path.exists()
    assert [(s, v) for s, v, _ in _history(mlflow_server.uri, run_id, "val_dice")] == [(1, 0.1), (3, 0.3)]
    rejected = _lines(outbox.rejected_path)
    assert len(rejected) == 1
    assert "INVALID_PARAMETER_VALUE" in rejected[0]["reason"]
    assert json.loads(rejected[0]["line"])["metrics"] == {"bad key!": 0.2}
    # A new batch is refused the same way while the server is up: kept aside, reported False, never raised.
    assert outbox.log_metrics({"bad key!": 0.4}, 4) is False
    assert len(_lines(outbox.rejected_path)) == 2
    assert outbox.log_metrics({"val_dice": 0.5}, 5) is True


class _Unavailable(http.server.BaseHTTPRequestHandler):
    """Answers every request 503 (retried by MLflow) and records the HTTP policy variables in force at that moment
    (the server runs in the test's process, so it sees the environment the outbox set for its call)."""

    seen: list[dict[str, str | None]] = []

    def _answer(self) -> None:
        self.seen.append({k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_TIMEOUT",
                                                          "MLFLOW_HTTP_REQUEST_MAX_RETRIES")})
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


def test_an_offline_call_tries_as_the_outbox_says_and_restores_the_http_variables(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "77")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", raising=False)
    monkeypatch.setattr(_Unavailable, "seen", [])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        outbox = MetricsOutbox(tmp_path, "0" * 32, f"http://127.0.0.1:{server.server_address[1]}")
        assert outbox.log_metrics({"train_loss": float("nan"), "lr": float("inf")}, 1) is False
    finally:
        server.shutdown()
        server.server_close()
    # The server counted the attempts: one and the outbox's 2 retries (MLflow's default would make 8), each under
    # the outbox's 5 s timeout (not the user's 77 s).
    expected = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}
    assert _Unavailable.seen == [expected] * (1 + OUTBOX_POLICY["max_retries"])
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "77"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR" not in os.environ
    # Strict JSON on disk even for NaN/inf, and they come back as such.
    line = outbox.path.read_text()
    assert "NaN" in line and json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard {c}"))
    assert outbox.pending() == 2


def test_torn_last_line_is_kept_aside_and_not_glued_to(tmp_path: Path) -> None:
    outbox = _offline_outbox(tmp_path, "1" * 32)
    assert outbox.log_metrics({"a": 1.0}, 1) is False
    with outbox.path.open("a") as f:
        f.write('{"step": 2, "timest')  # a crash in the middle of an append
    assert outbox.log_metrics({"a": 3.0}, 3) is False
    assert outbox.pending() == 2
    assert [line["step"] for line in _lines(outbox.path)] == [1, 3]
    rejected = _lines(outbox.rejected_path)
    assert rejected[0]["line"] == '{"step": 2, "timest'
    # A readable line with an unusable value is kept aside too, instead of failing every flush.
    with outbox.path.open("a") as f:
        f.write('{"step": 4, "timestamp": 1, "metrics": {"a": "oops"}}\n')
    assert outbox.pending() == 2
    assert json.loads(_lines(outbox.rejected_path)[1]["line"])["metrics"] == {"a": "oops"}


def test_check_refused_names_uri_without_credentials() -> None:
    port = free_port()
    with pytest.raises(TrackingUnavailableError) as info:
        check_tracking_server(f"http://alice:s3cret@127.0.0.1:{port}", timeout_s=2)
    message = str(info.value)
    assert f"http://127.0.0.1:{port}" in message and "connection refused" in message
    assert "s3cret" not in message and "alice" not in message and "\n" not in message
    assert info.value.exit_code == EXIT_TRACKING_UNAVAILABLE == 5
    assert redact_uri("https://u:p@host:8443/mlflow") == "https://host:8443/mlflow"


def test_check_timeout_when_the_server_never_answers() -> None:
    with socket.socket() as listener:  # accepts connections (kernel backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(TrackingUnavailableError, match="timeout"):
            check_tracking_server(uri, timeout_s=0.5)
        # No retries: the check connected exactly once (each attempt waits in the backlog until accepted here).
        listener.setblocking(False)
        connections = []
        while True:
            try:
                connections.append(listener.accept()[0])
            except BlockingIOError:
                break
        for conn in connections:
            conn.close()
        assert len(connections) == 1


class _Status503(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        self.send_response(503)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_check_reports_http_status_and_skips_local_stores(tmp_path: Path) -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Status503)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(TrackingUnavailableError, match="HTTP 503"):
            check_tracking_server(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=2)
    finally:
        server.shutdown()
        server.server_close()
    check_tracking_server(f"sqlite:///{tmp_path / 'nothing-here' / 'mlflow.db'}")
    check_tracking_server(str(tmp_path / "mlruns"))
