"""Two-node DDP for real: two ``torchrun --nnodes=2`` process trees on loopback (Gloo on CPU) train one model.

Each "node" is its own ``torchrun`` agent with its own worker, meeting through c10d rendezvous on
127.0.0.1, as two machines of a cluster would; they share the work directory (as nodes share an NFS
one) and log to a real ``mlflow server``. Then one node is SIGKILLed mid-training (agent and worker,
as when a machine dies): the other stops at once with one clear line, and a plain call resumes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.errors import EXIT_PEER_LOST
from tests.conftest import TINY
from tests.mlflow_server import MlflowServer, free_port, mlflow_server  # noqa: F401

pytestmark = pytest.mark.slow

HANG_S = 240  # far beyond what any step here takes: reaching it means a node hangs


def _config(tmp_path: Path, uri: str, experiment: str, **train: object) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["train"].update({"num_threads": 1, **train})
    cfg["mlflow"].update({"tracking_uri": uri, "experiment": experiment})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _node(config: Path, work: Path, port: int, logs: Path, name: str, **env_extra: str) -> subprocess.Popen:
    """One "node": a torchrun agent in its own process group; its worker's streams go to ``logs/name``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=test-{port}",
           "--log-dir", str(logs / name), "--redirects=3",
           "-m", "pipeline", "train", str(config), "--work-dir", str(work)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    with (logs / f"{name}.agent.log").open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _two_nodes(config: Path, work: Path, logs: Path, **env: str) -> tuple[subprocess.Popen, subprocess.Popen]:
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    first = _node(config, work, port, logs, "node0", **env)
    # node0 hosts the rendezvous store (it binds the port first); node1 joins it as a second machine would.
    deadline = time.monotonic() + HANG_S
    while not _listening(port) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.1)
    return first, _node(config, work, port, logs, "node1", **env)


@pytest.fixture
def start_two_nodes():
    """``_two_nodes``, with every node still running at the end of the test killed (a failed test leaks none)."""
    started: list[subprocess.Popen] = []

    def start(config: Path, work: Path, logs: Path, **env: str) -> tuple[subprocess.Popen, subprocess.Popen]:
        nodes = _two_nodes(config, work, logs, **env)
        started.extend(nodes)
        return nodes

    yield start
    for node in started:
        if node.poll() is None:
            _kill_node(node, signal.SIGCONT)  # a frozen node takes SIGKILL either way; its group may be stopped
            _kill_node(node)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(proc: subprocess.Popen) -> int:
    try:
        return proc.wait(timeout=HANG_S)
    except subprocess.TimeoutExpired:
        _kill_node(proc)
        pytest.fail(f"node (pid {proc.pid}) still running after {HANG_S} s: it hangs")


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _kill_node(agent: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal a whole node: torchrun starts each worker in a session of its own, so signal those groups too."""
    groups = [agent.pid, *_children(agent.pid)]
    for group in groups:
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            pass
    if sig == signal.SIGKILL:
        agent.wait()


def _worker_stderr(logs: Path, name: str) -> str:
    files = list((logs / name).rglob("stderr.log"))
    assert len(files) == 1, files
    # tqdm redraws with carriage returns: each redraw counts as a line of its own.
    return files[0].read_text(errors="replace").replace("\r", "\n")


def _wait_for_epoch(last: Path, epoch: int, nodes: tuple[subprocess.Popen, ...]) -> None:
    deadline = time.monotonic() + HANG_S
    while _epoch_of(last) < epoch and time.monotonic() < deadline and all(n.poll() is None for n in nodes):
        time.sleep(0.1)
    assert all(n.poll() is None for n in nodes), "training ended before a node could be stopped"


def _the_one_error_line(logs: Path, name: str) -> str:
    """The worker's one ``error:`` line, checked to be its last line and to come without a traceback."""
    stderr = _worker_stderr(logs, name)
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    assert lines[-1] == errors[0]  # nothing after it: no traceback, no teardown noise
    assert "Traceback" not in stderr
    assert "distributed training lost a process" in errors[0] and "Rerun the same command" in errors[0]
    # torchrun reports its worker's exit code (the agent itself exits 1).
    assert f"exitcode: {EXIT_PEER_LOST}" in (logs / f"{name}.agent.log").read_text()
    return errors[0]


def _epoch_of(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except (OSError, RuntimeError, KeyError, EOFError):
        return 0


def _runs(uri: str, experiment: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def test_two_nodes_train_one_model(tmp_path: Path, mlflow_server: MlflowServer,  # noqa: F811
                                   start_two_nodes) -> None:
    mlflow_server.start()
    config = _config(tmp_path, mlflow_server.uri, "multinode-one-model", epochs=3, iterations_per_epoch=2,
                     val_every=1)
    work = tmp_path / "work"
    nodes = start_two_nodes(config, work, tmp_path / "logs")
    codes = [_wait(node) for node in nodes]
    assert codes == [0, 0], (tmp_path / "logs" / "node0.agent.log").read_text()[-3000:]
    (run,) = _runs(mlflow_server.uri, "multinode-one-model")  # one run: only rank 0 logs
    assert run.info.status == "FINISHED"
    assert run.data.params["ddp.world_size"] == "2"
    checksums = json.loads(run.data.tags["ddp.param_checksums"])
    assert len(checksums) == 2 and checksums[0] == pytest.approx(checksums[1], rel=0, abs=1e-9)
    files = sorted(p.name for p in (work / "checkpoints").rglob("*") if p.is_file())
    assert files == ["best.pt", "final.pt", "history.jsonl", "last.pt", "training_curves.png"]  # one writer
    state = torch.load(work / "checkpoints" / "fold_0" / "last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 3 and state["mlflow_run_id"] == run.info.run_id
    # Exactly one of the two workers was rank 0 and printed the run's summary.
    summaries = [_worker_stdout(tmp_path / "logs", name).count("MLflow run id:") for name in ("node0", "node1")]
    assert sorted(summaries) == [0, 1]


def _worker_stdout(logs: Path, name: str) -> str:
    (path,) = (logs / name).rglob("stdout.log")
    return path.read_text(errors="replace")


def test_killing_a_node_stops_the_other_clearly_and_a_plain_call_resumes(
        tmp_path: Path, mlflow_server: MlflowServer, start_two_nodes) -> None:  # noqa: F811
    mlflow_server.start()
    epochs = 10
    config = _config(tmp_path, mlflow_server.uri, "multinode-kill", epochs=epochs, iterations_per_epoch=4,
                     val_every=4)
    work, logs = tmp_path / "work", tmp_path / "logs"
    last = work / "checkpoints" / "fold_0" / "last.pt"
    survivor, victim = start_two_nodes(config, work, logs)
    _wait_for_epoch(last, 2, (survivor, victim))
    _kill_node(victim)

    code = _wait(survivor)
    assert code != 0
    killed_at = _epoch_of(last)
    assert 2 <= killed_at < epochs
    assert re.search(r"Connection (closed|reset) by peer", _the_one_error_line(logs, "node0"))

    (run,) = _runs(mlflow_server.uri, "multinode-kill")
    run_id = run.info.run_id
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    res = subprocess.run([sys.executable, "-m", "pipeline", "train", str(config), "--work-dir", str(work)],
                         capture_output=True, text=True, timeout=HANG_S, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["epoch"] == epochs and state["mlflow_run_id"] == run_id
    (after,) = _runs(mlflow_server.uri, "multinode-kill")  # the same run continued, no new one
    assert after.info.run_id == run_id and after.info.status == "FINISHED"
    import mlflow

    history = mlflow.MlflowClient(tracking_uri=mlflow_server.uri).get_metric_history(run_id, "train_loss")
    assert sorted({m.step for m in history}) == list(range(1, epochs + 1))  # no epoch lost


def test_lost_peer_errors_are_one_line_and_only_for_distributed_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.errors import user_error
    from pipeline.training.distributed import lost_peer

    gloo = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed "
                        "by peer [10.1.4.7]:45113. This is typically caused by a remote worker crashing. Check the "
                        "logs of the remote worker before reporting an error.")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert lost_peer(gloo) is None  # not under torchrun: a bug, shown as such
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    for raised in (gloo, torch.distributed.DistNetworkError("Connection reset by peer")):
        try:
            try:
                raise raised
            except RuntimeError as exc:
                raise ValueError("wrapped by a data loader") from exc
        except ValueError as wrapped:
            error = lost_peer(wrapped)
        assert error is not None and error.exit_code == EXIT_PEER_LOST
        assert "\n" not in str(error) and "rank 1 of 2" in str(error) and "This is typically" not in str(error)
    assert "Connection closed by peer [10.1.4.7]:45113" in str(lost_peer(gloo))
    assert lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None  # a bug stays a bug
    assert user_error(gloo) is None  # only the CLI's lost-peer check turns it into a line


def test_collective_timeout_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import timedelta

    from pipeline.errors import ConfigError
    from pipeline.training.distributed import TIMEOUT_ENV, collective_timeout

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert collective_timeout() == timedelta(minutes=30)
    monkeypatch.setenv(TIMEOUT_ENV, "0.5")
    assert collective_timeout() == timedelta(seconds=30)
    for bad in ("0", "-1", "soon", "nan"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(ConfigError, match=TIMEOUT_ENV):
            collective_timeout()
