"""DistributedDataParallel plumbing for ``torchrun``: one process per device, rank 0 does the bookkeeping."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


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


def init(device_type: str) -> DistEnv:
    """Join the process group when started by ``torchrun`` (NCCL on CUDA, Gloo on CPU).

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
        dist.init_process_group(backend=backend)
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
