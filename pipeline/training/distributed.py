"""DistributedDataParallel plumbing for ``torchrun``: one process per device, rank 0 does the bookkeeping."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pipeline.errors import ConfigError, PeerLostError

# How long a collective waits for a process that neither answers nor closes its connections (a hung
# node, or one cut off the network). A process that dies closes them, and the others stop within seconds.
# Rank 0 validates and preprocesses while the others wait in a barrier: it must cover that too.
TIMEOUT_ENV = "UNET_PIPELINE_DDP_TIMEOUT_MINUTES"
DEFAULT_TIMEOUT_MINUTES = 30.0
# What Gloo (plain RuntimeError) says when a peer is gone; NCCL and the store raise DistError.
_PEER_GONE = re.compile(r"gloo|connection (closed|reset) by peer|timed out waiting|broken pipe", re.IGNORECASE)


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job.

    Args:
        rank: global rank (0 logs to MLflow and writes checkpoints).
        world_size: number of processes.
        local_rank: rank on this node (selects the GPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this process does the logging and writing."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1


def current() -> DistEnv:
    """The environment ``torchrun`` set up (a single process when not under torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistEnv()


def collective_timeout() -> timedelta:
    """How long a collective waits for a silent peer: ``$UNET_PIPELINE_DDP_TIMEOUT_MINUTES``, default 30."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return timedelta(minutes=DEFAULT_TIMEOUT_MINUTES)
    try:
        minutes = float(raw)
    except ValueError:
        minutes = 0.0
    if not 0 < minutes <= 1e6:  # NaN fails too
        raise ConfigError(f"{TIMEOUT_ENV} must be a number of minutes > 0, got {raw!r}")
    return timedelta(minutes=minutes)


def init(device_type: str) -> DistEnv:
    """Join the process group when started by ``torchrun`` (NCCL on CUDA, Gloo on CPU).

    Collectives give up after :func:`collective_timeout`, so a hung node stops the job
    instead of holding the others forever.

    Args:
        device_type: ``cuda`` or ``cpu``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return DistEnv()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend, timeout=collective_timeout())
    return current()


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if current().enabled:
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process.

    Args:
        obj: a picklable value; only rank 0's matters.
    """
    if not current().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_true(flag: bool) -> bool:
    """True on every process when it is true on any (so all stop at the same step).

    Args:
        flag: this process's flag.
    """
    if not current().enabled:
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order.

    Args:
        obj: a picklable value.
    """
    if not current().enabled:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    """Leave the process group."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def lost_peer(exc: BaseException) -> PeerLostError | None:
    """The one-line error for a ``torchrun`` job that lost a process, when ``exc`` is that; else None.

    A node that dies (SIGKILL, OOM, a crash) closes its connections: the others' next collective
    fails at once. One that hangs makes it fail after :func:`collective_timeout`. Either way every
    checkpoint written so far is complete (they are written atomically), so the same command resumes.

    Args:
        exc: the exception that ended the command.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cause = _peer_failure(exc) if world > 1 else None
    if cause is None:
        return None
    rank = os.environ.get("RANK", "?")
    return PeerLostError(
        f"distributed training lost a process (this is rank {rank} of {world}): {_reason(cause)}. Another node "
        f"died, was killed or stopped answering (its own log says why); this one stopped too, keeping the last "
        f"checkpoint. Rerun the same command (torchrun on every node, or a plain call on one machine) to resume "
        f"in the same MLflow run"
    )


def _peer_failure(exc: BaseException) -> BaseException | None:
    """The Gloo/NCCL/store error along ``exc``'s chain (DDP and MONAI may wrap it), or None."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        if isinstance(link, dist.DistError) or (isinstance(link, RuntimeError) and _PEER_GONE.search(str(link))):
            return link
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return None


def _reason(exc: BaseException) -> str:
    """The gist of a Gloo/NCCL/store message: its first line, without the source location or advice."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # "[.../gloo/transport/tcp/pair.cc:561] "
    text = re.split(r"\.\s+(?:This is typically|Check the logs)", text)[0]
    return text.rstrip(". ")[:200] or type(exc).__name__
