"""The champion gate is race-free: candidates gated at the same instant end as if gated one after the other.

Everything runs against a real ``mlflow server`` (SQLite behind it), and a local SQLite store
for the default set-up. The candidates are cheap: their Dice (and the champion's) are known
numbers, and a version is registered without artifacts; but the lease, the champion lookup,
the decision, the registration, the description and the aliases are the gate's real code
(:func:`pipeline.registry.gated_registration`, as ``run`` calls it) talking to the real server.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline import registry
from pipeline.evaluation import EvaluationResult
from pipeline.inference import Postprocessing
from pipeline.registry.lease import GateLease, GateLeaseError, Ticket
from tests.conftest import REPO
from tests.mlflow_server import MlflowServer, mlflow_server  # noqa: F401

pytestmark = pytest.mark.slow  # a real server, a killed subprocess, lease expiries: ~50 s
LABEL = "hippocampus"
OLD_CHAMPION_DICE, WORSE, BETTER = 0.50, 0.70, 0.80
# Scoring the champion takes longer for the worse candidate: without the lease it finishes last and overwrites.
SCORING_S = {BETTER: 0.05, WORSE: 0.6}


def _evaluation(dice: float) -> EvaluationResult:
    return EvaluationResult({"mean_dice": dice, "dice_per_label": {LABEL: dice}}, [{"case": "c1", LABEL: dice}],
                            Postprocessing())


@pytest.fixture(scope="module")
def server(mlflow_server: MlflowServer) -> MlflowServer:  # noqa: F811
    """The module's server as the current MLflow tracking and registry URI, with an experiment for the runs."""
    import mlflow

    mlflow_server.start()
    mlflow.set_tracking_uri(mlflow_server.uri)
    mlflow.set_registry_uri(mlflow_server.uri)
    client = mlflow.MlflowClient(mlflow_server.uri, mlflow_server.uri)
    if client.get_experiment_by_name("gate-race") is None:
        client.create_experiment("gate-race")
    return mlflow_server


def _model_with_champion(uri: str, name: str) -> None:
    """A registered model whose version 1 (Dice 0.5) holds ``champion``."""
    import mlflow

    client = mlflow.MlflowClient(uri, uri)
    client.create_registered_model(name)
    with mlflow.start_run(experiment_id=client.get_experiment_by_name("gate-race").experiment_id) as run:
        client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id,
                                    tags={"dice": str(OLD_CHAMPION_DICE)}, await_creation_for=0)
    client.set_registered_model_alias(name, "champion", "1")


def _candidate(uri: str, name: str, dice: float, barrier: threading.Barrier, use_lease: bool, out: dict) -> None:
    """One job's end: gate -> register -> describe -> aliases, through the gate's own critical section."""
    import mlflow

    client = mlflow.MlflowClient(uri, uri)

    def score_version(version: str, tmp: Path) -> EvaluationResult:
        time.sleep(SCORING_S[dice])  # the champion's inference on the gate's cases
        return _evaluation(float(client.get_model_version(name, version).tags["dice"]))

    def gate() -> tuple[Any, str]:
        return registry.judge(name, _evaluation(dice), score_version, 0.0, str, [LABEL]), "known Dice"

    with mlflow.start_run(experiment_id=client.get_experiment_by_name("gate-race").experiment_id) as run:
        def register() -> str:
            version = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id,
                                                  tags={"dice": str(dice)}, await_creation_for=0)
            return str(version.version)

        def describe(version: str, result: Any, eval_set: str) -> None:
            client.set_model_version_tag(name, version, "gate.decision", result.decision)

        lease = GateLease(name, lease_s=10, wait_s=60, poll_s=0.05) if use_lease else None
        barrier.wait()
        out[dice] = registry.gated_registration(name, lease, gate, register, describe)


def _gate_pair(uri: str, name: str, use_lease: bool) -> tuple[float, dict]:
    """Two candidates (Dice 0.7 and 0.8) gated at the same instant; the champion's Dice after both."""
    import mlflow

    _model_with_champion(uri, name)
    barrier, out = threading.Barrier(2), {}
    threads = [threading.Thread(target=_candidate, args=(uri, name, d, barrier, use_lease, out)) for d in (WORSE, BETTER)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert set(out) == {WORSE, BETTER}, "a candidate's gate raised (see the captured log)"
    champion = mlflow.MlflowClient(uri, uri).get_model_version_by_alias(name, "champion")
    return float(champion.tags["dice"]), out


def test_the_better_candidate_is_champion_every_time(server: MlflowServer) -> None:
    for i in range(10):
        champion_dice, out = _gate_pair(server.uri, f"race-{i}", use_lease=True)
        assert champion_dice == BETTER, f"try {i}: the worse candidate is champion"
        # One after the other: exactly one saw the old champion, the other the first's outcome.
        (first_dice, first), (second_dice, second) = sorted(
            out.items(), key=lambda kv: int(kv[1][2].version))
        assert first[0].champion_version == "1" and first[0].promoted
        expected = first[2].version if first[0].promoted else "1"
        assert second[0].champion_version == expected, f"try {i}: the second gate did not see the first's outcome"
        assert second[0].promoted == (second_dice > first_dice)


def test_without_the_lease_the_race_is_real(server: MlflowServer) -> None:
    """The control: the same two candidates with no lease; the slower, worse one overwrites the better."""
    seen = []
    for i in range(3):
        champion_dice, out = _gate_pair(server.uri, f"no-lease-{i}", use_lease=False)
        seen.append(champion_dice)
        assert out[WORSE][0].champion_version == out[BETTER][0].champion_version == "1"  # both read the old one
    assert WORSE in seen, f"the race was never observed without the lease (champion Dice {seen}): the test proves nothing"


_HOLDER = """
import sys, time
from pipeline.registry.lease import GateLease
lease = GateLease(sys.argv[2], lease_s=float(sys.argv[3]), registry_uri=sys.argv[1])
lease.acquire()
print(lease.holder, flush=True)
time.sleep(600)
"""


def test_a_killed_holder_blocks_the_next_gate_only_until_its_lease_expires(
        server: MlflowServer, caplog: pytest.LogCaptureFixture) -> None:
    import mlflow

    lease_s = 3.0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    job = subprocess.Popen([sys.executable, "-c", _HOLDER, server.uri, "killed", str(lease_s)], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        holder = job.stdout.readline().strip()
        assert holder, "the holder job did not take the lease"
        # Alive and renewing: the lease is its own, however long it holds it.
        with pytest.raises(GateLeaseError, match="registry.gate_wait_s"):
            GateLease("killed", lease_s=lease_s, wait_s=lease_s + 1, poll_s=0.2, registry_uri=server.uri).acquire()
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=30)
    caplog.set_level(logging.WARNING, logger="pipeline.registry.lease")
    # Bounded by its own timeout: expiry plus a poll or two, never the dead job's lifetime.
    with GateLease("killed", lease_s=lease_s, wait_s=lease_s + 10, poll_s=0.2, registry_uri=server.uri) as lease:
        lease.check()
        tickets = mlflow.MlflowClient(server.uri, server.uri).search_model_versions("name='killed.gate-lease'")
        assert [int(t.version) for t in tickets] == [lease.number], "the dead job's ticket was not removed"
    text = caplog.text
    assert f"held by {holder}" in text, text
    assert "without a heartbeat" in text and "taking over" in text, text
    assert "/" not in holder.split("/pid")[0]  # host/pid/id: no path in it


def test_release_lets_the_next_gate_in_at_once_and_removes_the_ticket(server: MlflowServer) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    first = GateLease("released", lease_s=30, wait_s=0, registry_uri=server.uri)
    with first:
        number = first.number
        with pytest.raises(GateLeaseError, match=re.escape(first.holder)):
            GateLease("released", lease_s=30, wait_s=0, registry_uri=server.uri).acquire()
    with pytest.raises(GateLeaseError, match="not held"):
        first.check()
    client = mlflow.MlflowClient(server.uri, server.uri)
    with GateLease("released", lease_s=30, wait_s=0, registry_uri=server.uri) as second:
        assert second.number > number
        assert [int(v.version) for v in client.search_model_versions("name='released.gate-lease'")] == [second.number]
    assert client.search_model_versions("name='released.gate-lease'") == []
    lease_model = client.get_registered_model("released.gate-lease")
    assert lease_model.tags["unet_pipeline.kind"] == "gate-lease"
    assert lease_model.tags["unet_pipeline.lease_for"] == "released"
    with pytest.raises(MlflowException):  # the lease model never holds aliases of the real model's
        client.get_model_version_by_alias("released.gate-lease", "champion")


def test_the_heartbeat_keeps_a_lease_held_longer_than_its_lease_time(server: MlflowServer) -> None:
    import mlflow

    client = mlflow.MlflowClient(server.uri, server.uri)
    with GateLease("renewed", lease_s=1.0, wait_s=0, registry_uri=server.uri) as lease:
        created = int(client.get_model_version("renewed.gate-lease", str(lease.number)).last_updated_timestamp)
        time.sleep(2.5)  # 2.5 lease times: without renewals it would have expired twice
        lease.check()
        renewed = client.get_model_version("renewed.gate-lease", str(lease.number))
        assert int(renewed.last_updated_timestamp) > created
        assert "heartbeat" in renewed.description
        with pytest.raises(GateLeaseError, match=re.escape(lease.holder)):
            GateLease("renewed", lease_s=1.0, wait_s=0, registry_uri=server.uri).acquire()


def test_a_holder_whose_ticket_was_taken_over_knows_it_lost_the_lease(server: MlflowServer) -> None:
    import mlflow

    with GateLease("lost", lease_s=1.0, wait_s=0, registry_uri=server.uri) as lease:
        lease.check()
        # What a waiting gate does to a ticket it judged expired.
        mlflow.MlflowClient(server.uri, server.uri).delete_model_version("lost.gate-lease", str(lease.number))
        for _ in range(50):  # the next heartbeat (every lease_s / 3) finds the ticket gone
            if lease._lost:
                break
            time.sleep(0.1)
        with pytest.raises(GateLeaseError, match="removed as expired by another gate"):
            lease.check()


def test_expiry_is_judged_on_the_registry_clock() -> None:
    ticket = Ticket(3, "host/pid 1/abc", lease_s=5.0, renewed_ms=1_000_000)
    assert not ticket.expired(1_000_000 + 4_999)
    assert ticket.expired(1_000_000 + 5_001)


def test_the_lease_serialises_gates_on_the_default_local_sqlite_store(tmp_path: Path) -> None:
    """No server: several processes' gates share the work directory's SQLite file; concurrent creates there retry."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    inside: list[int] = []
    overlaps: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def gate(i: int) -> None:
        try:
            barrier.wait()
            with GateLease("local", lease_s=10, wait_s=60, poll_s=0.05, registry_uri=uri) as lease:
                inside.append(i)
                overlaps.extend([i] if len(inside) > 1 else [])
                time.sleep(0.1)
                lease.check()
                inside.remove(i)
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=gate, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert overlaps == [], "two gates were inside at once"
