"""A lease held in the MLflow model registry: one champion gate at a time per registered model, across machines.

Two candidates gated at the same moment must end as if gated one after the other, and the
jobs may share nothing but the tracking server, so no local file lock can serve. MLflow tags
are not compare-and-swap; what the registry does atomically is number a new model version
(``max + 1`` under the table's primary key, in one transaction: a concurrent create fails
and retries with the next number). So the lease is a companion registered model,
``<name>.gate-lease``, whose versions are **tickets**:

* a gate takes a ticket (a new version: unique, increasing) tagged with its holder
  (host, pid and a random id; no paths);
* it holds the lease once every lower ticket is gone (released) or expired;
* while waiting or holding, a heartbeat thread renews its ticket every ``lease_s / 3``;
  a ticket not renewed for ``lease_s`` is expired, so a killed job blocks the next gate
  only until then (the next gate deletes it);
* release deletes the ticket.

Expiry is judged on the registry's clock, never the hosts': a renewal is
``update_model_version``, which stamps ``last_updated_timestamp`` on the server, and each
gate knows the server's time from its own ticket's last renewal plus its local monotonic
clock since. Skewed host clocks cannot expire a live holder.

A holder that lost its lease (its heartbeat could not reach the server for ``lease_s``, or
another gate deleted its expired ticket) learns it from :meth:`GateLease.check`, which the
gate calls before it moves any alias: then nothing moves.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pipeline.errors import LockHeldError

logger = logging.getLogger(__name__)
T = TypeVar("T")

LEASE_SUFFIX = ".gate-lease"
TICKET_SOURCE = "lease:/ticket"  # not an artifact: a scheme no artifact repository or source check claims
HOLDER_TAG, TTL_TAG = "holder", "lease_s"
KIND_TAG = "unet_pipeline.kind"
_CREATE_TRIES = 6


class GateLeaseError(LockHeldError):
    """The champion gate's lease could not be taken in time, or was lost while held (exit 3)."""


@dataclass(frozen=True)
class Ticket:
    """One ticket (a version of the lease model) as a waiting gate sees it.

    Args:
        number: the version number: the queue position.
        holder: who took it (host/pid/random id).
        lease_s: its holder's lease time.
        renewed_ms: the registry's time of its last renewal.
    """

    number: int
    holder: str
    lease_s: float
    renewed_ms: int

    def expired(self, server_now_ms: float) -> bool:
        """Whether it went unrenewed for longer than its lease time.

        Args:
            server_now_ms: the registry's time now (an estimate that never runs ahead).
        """
        return server_now_ms > self.renewed_ms + self.lease_s * 1000


def lease_model_name(model_name: str) -> str:
    """The companion registered model that holds ``model_name``'s gate tickets.

    Args:
        model_name: the registered model the gate promotes in.
    """
    return f"{model_name}{LEASE_SUFFIX}"


def _direct(action: Callable[[], T], what: str) -> T:
    return action()


class GateLease:
    """The champion gate's lease for one registered model (a context manager).

    Args:
        model_name: the registered model whose champion the gate may move.
        lease_s: how long a ticket lives without a renewal (``registry.gate_lease_s``).
        wait_s: how long to wait for the lease before giving up (``registry.gate_wait_s``).
        poll_s: pause between looks at the queue; default ``lease_s / 10`` within 0.2-2 s.
        call: runs one registry call (e.g. :meth:`~pipeline.registry.tracking.RunLogger.call`,
            which waits out a tracking-server outage); default: call it directly.
        registry_uri: the registry; default: MLflow's current one.
    """

    def __init__(self, model_name: str, lease_s: float = 60.0, wait_s: float = 3600.0, poll_s: float | None = None,
                 call: Callable[[Callable[[], Any], str], Any] | None = None, registry_uri: str | None = None) -> None:
        if lease_s <= 0 or wait_s < 0:
            raise ValueError(f"lease_s must be > 0 and wait_s >= 0, got {lease_s} and {wait_s}")
        self.model_name, self.name = model_name, lease_model_name(model_name)
        self.lease_s, self.wait_s = float(lease_s), float(wait_s)
        self.poll_s = poll_s if poll_s is not None else min(2.0, max(0.2, lease_s / 10))
        self.call = call or _direct
        self.registry_uri = registry_uri
        self.holder = f"{socket.gethostname()}/pid {os.getpid()}/{uuid.uuid4().hex[:8]}"
        self.number: int | None = None
        self.held = False
        # The registry's clock: the last renewal's server time, with the local monotonic times at which the
        # request left (expiry of our own lease: judged early) and its answer came (others': judged late).
        self._renewed_ms = 0
        self._sent = self._answered = 0.0
        self._lost: str | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._clock = threading.Lock()

    # -- the registry ------------------------------------------------------------------------------------
    def _client(self) -> Any:
        import mlflow

        uri = self.registry_uri or mlflow.get_registry_uri()
        return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)

    def _ensure_model(self, client: Any) -> None:
        from mlflow.exceptions import MlflowException

        try:
            client.get_registered_model(self.name)
            return
        except MlflowException:
            pass
        try:
            client.create_registered_model(
                self.name, tags={KIND_TAG: "gate-lease", "unet_pipeline.lease_for": self.model_name},
                description=(f"Champion-gate lease of registered model '{self.model_name}': its versions are queue "
                             "tickets of gates in progress, not models. Nothing to use or delete here."))
        except Exception:
            client.get_registered_model(self.name)  # a concurrent gate created it first: fine; else a real error

    def _note_renewal(self, version: Any, sent: float) -> None:
        with self._clock:
            self._renewed_ms = int(version.last_updated_timestamp)
            self._sent, self._answered = sent, time.monotonic()

    def _server_now_ms(self, early: bool) -> float:
        """The registry's time now: from the last renewal, counting from when the request left (``early``:
        never behind the truth) or from when its answer came (never ahead)."""
        with self._clock:
            since = self._sent if early else self._answered
            return self._renewed_ms + (time.monotonic() - since) * 1000

    def _take_ticket(self) -> None:
        client = self._client()
        self._ensure_model(client)
        tags = {HOLDER_TAG: self.holder, TTL_TAG: f"{self.lease_s:g}"}
        for attempt in range(_CREATE_TRIES):
            sent = time.monotonic()
            try:
                version = client.create_model_version(self.name, TICKET_SOURCE, tags=tags,
                                                      description="waiting", await_creation_for=0)
            except Exception:
                # Concurrent creates on SQLite can fail (a locked database, a taken number) after MLflow's own
                # retries; a create that failed only on the way back left a ticket: adopt it, never leave it.
                mine = [t for t in self._tickets(client) if t.holder == self.holder]
                if mine:
                    self.number = mine[0].number
                    self._note_renewal(client.get_model_version(self.name, str(self.number)), sent)
                    return
                if attempt == _CREATE_TRIES - 1:
                    raise
                time.sleep(random.uniform(0.05, 0.3) * (attempt + 1))
                continue
            self.number = int(version.version)
            self._note_renewal(version, sent)
            return

    def _tickets(self, client: Any) -> list[Ticket]:
        found = client.search_model_versions(f"name='{self.name}'")
        return sorted((Ticket(int(v.version), v.tags.get(HOLDER_TAG, "unknown"), float(v.tags.get(TTL_TAG, self.lease_s)),
                              int(v.last_updated_timestamp)) for v in found), key=lambda t: t.number)

    def _renew(self, client: Any, beat: int) -> bool:
        from mlflow.exceptions import MlflowException

        sent = time.monotonic()
        try:
            version = client.update_model_version(self.name, str(self.number),
                                                  description=f"{'held' if self.held else 'waiting'}, heartbeat {beat}")
        except MlflowException as error:
            if "RESOURCE_DOES_NOT_EXIST" in str(getattr(error, "error_code", "")):
                self._lost = f"ticket {self.number} was removed as expired by another gate"
                self._stop.set()
            else:
                logger.warning("could not renew the champion gate's lease of '%s' (%s); retrying",
                               self.model_name, str(error).splitlines()[0][:200] if str(error) else type(error).__name__)
            return False
        except Exception as error:  # the server away: the lease runs out unless a later renewal gets through
            logger.warning("could not renew the champion gate's lease of '%s' (%s); retrying",
                           self.model_name, type(error).__name__)
            return False
        self._note_renewal(version, sent)
        return True

    def _heartbeat(self) -> None:
        client = self._client()
        beat, pause = 0, self.lease_s / 3
        while not self._stop.wait(pause):
            beat += 1
            # After a failed renewal, try again soon: two more misses would let the lease run out.
            pause = self.lease_s / 3 if self._renew(client, beat) else self.lease_s / 10

    # -- the lease ---------------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take a ticket and wait until every lower one is released or expired.

        Raises:
            GateLeaseError: not held within ``wait_s`` (the message names the holder).
        """
        self.call(self._take_ticket, "taking a ticket for the champion gate")
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"gate-lease-{self.number}", daemon=True)
        self._beat.start()
        try:
            self._wait_for_turn()
        except BaseException:
            self.release()
            raise
        self.held = True

    def _wait_for_turn(self) -> None:
        client = self._client()
        deadline = time.monotonic() + self.wait_s
        announced: int | None = None
        while True:
            if self._lost:
                raise GateLeaseError(f"lost the champion gate's lease of '{self.model_name}' while waiting: {self._lost}")
            tickets = self.call(lambda: self._tickets(client), "looking at the champion gate's queue")
            now = self._server_now_ms(early=False)
            ahead = [t for t in tickets if t.number < (self.number or 0)]
            for t in [t for t in ahead if t.holder == self.holder]:
                self._forget(client, t.number)  # ours, from a create whose answer was lost in an outage
            ahead = [t for t in ahead if t.holder != self.holder]
            for t in [t for t in ahead if t.expired(now)]:
                logger.warning("champion gate of '%s': ticket %d of %s went %.0f s without a heartbeat (lease %g s): "
                               "its job is gone; taking over", self.model_name, t.number, t.holder,
                               (now - t.renewed_ms) / 1000, t.lease_s)
                self._forget(client, t.number)
            alive = [t for t in ahead if not t.expired(now)]
            if not alive:
                return
            first = alive[0]
            if first.number != announced:
                logger.warning("champion gate of '%s' is held by %s (ticket %d); ticket %d waits behind %d, up to %g s "
                               "(a dead holder's lease expires %g s after its last heartbeat)", self.model_name,
                               first.holder, first.number, self.number, len(alive), self.wait_s, first.lease_s)
                announced = first.number
            if time.monotonic() + self.poll_s > deadline:
                raise GateLeaseError(
                    f"waited {self.wait_s:g} s for the champion gate of registered model '{self.model_name}': "
                    f"held by {first.holder} (ticket {first.number}, renewed {(now - first.renewed_ms) / 1000:.0f} s "
                    f"ago); raise registry.gate_wait_s, or wait: a dead holder's lease expires after {first.lease_s:g} s")
            time.sleep(self.poll_s)

    def _forget(self, client: Any, number: int) -> None:
        try:
            client.delete_model_version(self.name, str(number))
        except Exception:  # another gate removed it first, or the server blinked: it stays expired either way
            pass

    def check(self) -> None:
        """Raise unless the lease is certainly still ours: call it right before acting on it.

        Raises:
            GateLeaseError: never held, released, its ticket removed, or not renewed within ``lease_s``.
        """
        if not self.held or self._lost:
            raise GateLeaseError(f"the champion gate's lease of '{self.model_name}' is not held"
                                 + (f": {self._lost}" if self._lost else "") + "; nothing was moved, run again")
        left_s = self.lease_s - (self._server_now_ms(early=True) - self._renewed_ms) / 1000
        if left_s <= 0:
            raise GateLeaseError(
                f"the champion gate's lease of '{self.model_name}' ran out ({self.lease_s:g} s without a renewal: "
                "the tracking server was away?); another gate may have started, so nothing was moved; run again")

    def release(self) -> None:
        """Stop the heartbeat and delete the ticket (best effort: an undeleted ticket expires by itself)."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=30)
            self._beat = None
        if self.number is not None:
            self._forget(self._client(), self.number)
        self.held, self.number = False, None

    def __enter__(self) -> GateLease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
