"""How many CPUs this job may use, and the compute threads and data workers it takes from them.

A job rarely owns the whole machine, and ``os.cpu_count()`` sees none of what limits it: ``taskset``
or Slurm's binding give it an affinity mask, Kubernetes and systemd a CPU quota through its cgroup,
Slurm says ``SLURM_CPUS_PER_TASK``. The job uses the fewest of those. When several jobs share the
host's CPUs (``torchrun``'s processes: ``LOCAL_WORLD_SIZE``; jobs started side by side by hand:
``UNET_PIPELINE_JOBS``), each takes ``floor(cpus / jobs)``, at least 1, as PyTorch's own guidance
says. An explicit count still wins: ``train.num_threads``, ``--threads``, else ``OMP_NUM_THREADS``
(outside ``torchrun``, which sets it to 1 for its own processes).

Where the CPUs are shared, OpenMP's idle threads must sleep instead of spinning
(``OMP_WAIT_POLICY=PASSIVE``): spinning threads of one job take the cores another job's threads are
waiting for (two ``predict`` jobs at once on 2 cores: 83.5 s, against 38 s one after the other). A
job alone keeps the default, which is faster for it (19.0 s against 27.6 s with PASSIVE). libgomp
reads the policy once, when torch loads it, so :func:`set_wait_policy` must run before ``import
torch``: this module imports torch only inside :func:`apply`.

Jobs nobody declared (a colleague's ``predict`` started while the nightly ``run`` trains, ``pacs watch``
from cron) find each other through a folder of live jobs (:class:`HostJobs`): each job holds an
``flock`` on its own file while it lives, so a killed job's file is recognised as stale by the next
look. A job counts the live jobs whose CPUs overlap its own at start-up, and looks again every few
seconds while it computes (:func:`rebalance`): when a job starts or ends beside it, it takes its new
share of the CPUs with ``torch.set_num_threads``. The wait policy cannot change once torch has loaded;
it stays as it was chosen at start-up (sleeping only where jobs were declared or threads forced past
the CPUs), which is safe because after rebalancing the jobs' threads together no longer exceed the CPUs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.host_jobs import JOBS_DIR_ENV as JOBS_DIR_ENV
from pipeline.host_jobs import HostJobs as HostJobs
from pipeline.host_jobs import jobs_folder as jobs_folder

#: Jobs sharing this host's CPUs, for jobs started side by side by hand (e.g. the folds of a cross-validation).
JOBS_ENV = "UNET_PIPELINE_JOBS"
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
#: Seconds between two looks at the live jobs while a job computes: a look costs a directory listing.
REBALANCE_INTERVAL_S = 2.0
#: Data loader workers on a GPU: augmentation must keep up with the device, but more than 8 rarely helps.
MAX_GPU_WORKERS = 8


@dataclass(frozen=True)
class CpuBudget:
    """The CPUs one job may use, and where that figure comes from.

    Args:
        given: CPUs this process may use (the fewest of affinity mask, cgroup quota, ``SLURM_CPUS_PER_TASK``).
        jobs: jobs sharing them on this host (1: this job alone).
        reasons: what each source said, in words, for the start-up line.
        found: other jobs of this project found running on these CPUs (:class:`HostJobs`), which take their
            share again as jobs come and go (:func:`rebalance`); the rest of ``jobs`` were declared by a launcher.
    """

    given: int
    jobs: int
    reasons: tuple[str, ...]
    found: int = 0

    @property
    def per_job(self) -> int:
        """This job's share: ``floor(given / jobs)``, at least 1."""
        return max(1, self.given // self.jobs)


@dataclass(frozen=True)
class ThreadPlan:
    """What one job takes: compute threads, data workers, and whether idle threads sleep.

    Args:
        budget: the CPUs it may use.
        threads: torch's intra-op (and inter-op) threads.
        threads_from: what chose ``threads``: ``train.num_threads``, ``--threads``, ``OMP_NUM_THREADS``,
            or ``""`` (the budget).
        workers: data loader worker processes (1 thread each); ``None``: the command has none.
        passive: idle OpenMP threads sleep (``OMP_WAIT_POLICY=PASSIVE``) because the CPUs are shared.
    """

    budget: CpuBudget
    threads: int
    threads_from: str = ""
    workers: int | None = None
    passive: bool = False

    def line(self, environ: Mapping[str, str] | None = None) -> str:
        """The start-up line: how many threads and workers, and why.

        Args:
            environ: the environment (default ``os.environ``), for the wait policy in effect.
        """
        environ = os.environ if environ is None else environ
        b = self.budget
        forced = f" ({self.threads_from})" if self.threads_from else ""
        if self.workers is None:
            workers = "no data workers"
        else:
            workers = f"{self.workers} data worker{'s' if self.workers != 1 else ''}"
            workers += " (1 thread each)" if self.workers else " (augmentation runs in this process)"
        share = f": {b.per_job} CPU{'s' if b.per_job != 1 else ''} each" if b.jobs > 1 else ""
        text = f"threads: {self.threads} compute{forced}, {workers}: {', '.join(b.reasons)}{share}"
        policy = environ.get("OMP_WAIT_POLICY", "")
        if self.passive and policy.upper() == "PASSIVE":
            text += "; idle threads sleep (OMP_WAIT_POLICY=PASSIVE: the CPUs are shared)"
        elif policy:
            text += f"; OMP_WAIT_POLICY={policy} from the environment"
        return text


def _ranges(cpus: set[int]) -> str:
    """``{0, 1, 2, 5}`` as ``0-2,5``."""
    out: list[str] = []
    ordered = sorted(cpus)
    start = prev = ordered[0]
    for c in [*ordered[1:], None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        out.append(f"{start}-{prev}" if prev > start else str(start))
        if c is not None:
            start = prev = c
    return ",".join(out)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _ancestors(root: Path, cgroup_path: str) -> list[Path]:
    """The cgroup's folder and each parent up to the mount: a parent's limit applies to its children too.

    Inside a container the path may not exist under the mount (no cgroup namespace); then only the mount
    itself, which is the container's own cgroup, is read.
    """
    parts = [p for p in cgroup_path.strip("/").split("/") if p]
    folders = [root.joinpath(*parts[:i]) for i in range(len(parts), 0, -1)]
    return [f for f in folders if f.is_dir()] + [root]


def cgroup_quota(
    cgroup_root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP,
) -> tuple[float, str] | None:
    """The CPU quota of this process's cgroup, in CPUs, and the file it came from; ``None`` without one.

    cgroup v2: ``cpu.max`` (``"QUOTA PERIOD"``, ``max`` for none); v1: ``cpu.cfs_quota_us`` (-1 for
    none) over ``cpu.cfs_period_us`` under the ``cpu`` controller's mount. The process's own cgroup
    is read from ``/proc/self/cgroup``, and the tightest limit over it and its parents wins.

    Args:
        cgroup_root: where the cgroup file system is mounted (a parameter so tests can build one).
        proc_self_cgroup: the process's cgroup list.
    """
    listing = _read(proc_self_cgroup) or ""
    found: list[tuple[float, str]] = []
    for entry in listing.splitlines():
        hierarchy, _, rest = entry.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2, unified
            base = cgroup_root / "unified" if (cgroup_root / "unified" / "cgroup.controllers").exists() else cgroup_root
            for folder in _ancestors(base, path):
                fields = (_read(folder / "cpu.max") or "").split()
                if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit() and int(fields[1]) > 0:
                    found.append((int(fields[0]) / int(fields[1]), f"cpu.max {fields[0]} {fields[1]}"))
        elif "cpu" in controllers.split(","):  # cgroup v1: mounted as cpu,cpuacct (or cpu) with a link
            mounts = [cgroup_root / controllers, cgroup_root / "cpu", cgroup_root / "cpu,cpuacct"]
            base = next((m for m in mounts if m.is_dir()), None)
            if base is None:
                continue
            for folder in _ancestors(base, path):
                quota, period = _read(folder / "cpu.cfs_quota_us") or "", _read(folder / "cpu.cfs_period_us") or ""
                if quota.isdigit() and period.isdigit() and int(quota) > 0 and int(period) > 0:  # -1: none
                    found.append((int(quota) / int(period), f"cpu.cfs_quota_us {quota} / cpu.cfs_period_us {period}"))
    return min(found) if found else None


def _positive_int(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name, "").strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else None


def cpu_budget(
    environ: Mapping[str, str] | None = None, cgroup_root: Path = CGROUP_ROOT,
    proc_self_cgroup: Path = PROC_SELF_CGROUP, others: int = 0,
) -> CpuBudget:
    """The CPUs this process may use and how many jobs share them on this host.

    Args:
        environ: the environment (default ``os.environ``): ``SLURM_CPUS_PER_TASK``, ``LOCAL_WORLD_SIZE``,
            ``UNET_PIPELINE_JOBS``.
        cgroup_root: the cgroup mount (see :func:`cgroup_quota`).
        proc_self_cgroup: the process's cgroup list.
        others: other live jobs of this project found on this job's CPUs (:meth:`HostJobs.others`).
    """
    environ = os.environ if environ is None else environ
    reasons: list[str] = []
    mask, from_mask = _affinity()
    given = len(mask)
    if from_mask:
        reasons.append(f"affinity mask {_ranges(mask)} ({given} CPU{'s' if given != 1 else ''})")
    else:
        reasons.append(f"{given} CPUs")
    quota = cgroup_quota(cgroup_root, proc_self_cgroup)
    if quota is None:
        reasons.append("no cgroup quota")
    else:
        # Rounded up, as the JVM does: 1.5 CPUs of quota keep 2 threads busy 75 % of the time.
        given = min(given, max(1, math.ceil(quota[0] - 1e-9)))
        reasons.append(f"cgroup quota {quota[0]:g} CPUs ({quota[1]})")
    slurm = _positive_int(environ, "SLURM_CPUS_PER_TASK")
    if slurm is not None:
        given = min(given, slurm)
        reasons.append(f"SLURM_CPUS_PER_TASK={slurm}")
    jobs, why = _jobs_sharing(environ, others)
    return CpuBudget(given, jobs, (*reasons, why), others)


def _jobs_sharing(environ: Mapping[str, str], others: int) -> tuple[int, str]:
    """How many jobs share the CPUs (launcher's count, declared count, or this one and those found), and why."""
    local = _positive_int(environ, "LOCAL_WORLD_SIZE") or 1
    declared = _positive_int(environ, JOBS_ENV) or 1
    jobs = max(local, declared, 1 + others)
    if jobs == 1:
        return jobs, "1 job on this host"
    if 1 + others > max(local, declared):
        return jobs, (f"{jobs} jobs on this host ({others} other unet-pipeline job{'s' if others != 1 else ''} "
                      "found running on these CPUs)")
    if local >= declared:
        return jobs, f"{jobs} jobs on this host (LOCAL_WORLD_SIZE={local})"
    return jobs, f"{jobs} jobs on this host ({JOBS_ENV}={declared})"


def _affinity() -> tuple[set[int], bool]:
    """The CPUs this process may run on, and whether an affinity mask said so (macOS and Windows have none)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0)), True
    return set(range(os.cpu_count() or 1)), False


def _under_torchrun(environ: Mapping[str, str]) -> bool:
    return "TORCHELASTIC_RUN_ID" in environ or "LOCAL_WORLD_SIZE" in environ


def plan_threads(
    forced: int | None = None, forced_from: str = "", budget: CpuBudget | None = None,
    environ: Mapping[str, str] | None = None,
) -> ThreadPlan:
    """The compute threads of a job: an explicit count, else its share of the CPUs it may use.

    Args:
        forced: an explicit thread count (``train.num_threads``, ``--threads``); ``None`` or 0: none.
        forced_from: what gave ``forced``, for the start-up line.
        budget: the CPUs (default: :func:`cpu_budget`).
        environ: the environment (default ``os.environ``); ``OMP_NUM_THREADS`` counts as explicit outside torchrun.
    """
    environ = os.environ if environ is None else environ
    budget = budget or cpu_budget(environ)
    if not forced:
        omp = _positive_int(environ, "OMP_NUM_THREADS")
        if omp is not None and not _under_torchrun(environ):
            forced, forced_from = omp, "OMP_NUM_THREADS"
    forced = forced if forced and forced > 0 else None
    threads = forced or budget.per_job
    # Shared when a launcher declared jobs beside this one that are not all running yet, or when this job has
    # more threads than CPUs. Jobs found running take one share each, so together they do not exceed the CPUs;
    # and a job that outlives the others would keep the slower policy for the rest of its run.
    passive = budget.jobs > 1 + budget.found or threads > budget.per_job
    return ThreadPlan(budget, threads, forced_from if forced else "", None, passive)


def data_workers(configured: int | None, device_type: str, cpus: int) -> int:
    """Data loader worker processes for training.

    Args:
        configured: ``train.num_workers`` (wins when set).
        device_type: ``cpu`` or ``cuda``.
        cpus: this job's CPUs (:attr:`CpuBudget.per_job`).
    """
    if configured is not None:
        return configured
    # On a CPU the network needs every core; on a GPU, augmentation must keep up with it.
    return 0 if device_type == "cpu" else max(1, min(MAX_GPU_WORKERS, cpus - 1))


def set_wait_policy(plan: ThreadPlan, environ: MutableMapping[str, str] | None = None) -> bool:
    """Make idle OpenMP threads sleep where the CPUs are shared; returns whether this call set it.

    Only before torch is imported (libgomp reads it once, as torch loads it), and never over the
    user's own ``OMP_WAIT_POLICY``. A job alone is left as it is: spinning is faster there.

    Args:
        plan: the job's plan (:attr:`ThreadPlan.passive`).
        environ: the environment to set it in (default ``os.environ``).
    """
    environ = os.environ if environ is None else environ
    if not plan.passive or "OMP_WAIT_POLICY" in environ or "torch" in sys.modules:
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def apply(plan: ThreadPlan) -> None:
    """Give torch the plan's threads (intra-op, and inter-op where torch still allows it).

    Args:
        plan: from :func:`plan_threads`.
    """
    import torch

    torch.set_num_threads(plan.threads)
    try:
        torch.set_num_interop_threads(plan.threads)
    except RuntimeError:
        pass  # only settable once, before any inter-op work: a second call (or a library's) keeps the first


def single_threaded_worker(worker_id: int) -> None:
    """A data loader's ``worker_init_fn``: one compute thread per worker (the workers are processes already).

    Args:
        worker_id: the worker's index (unused).
    """
    import torch

    torch.set_num_threads(1)


@dataclass
class _Live:
    """This process's registration and what it decided last (module state: one job per process)."""

    jobs: HostJobs
    plan: ThreadPlan
    environ: Mapping[str, str]
    next_look: float = 0.0


_LIVE: _Live | None = None


def rebalance(now: float | None = None) -> int | None:
    """Take this job's share again when jobs have started or ended beside it; cheap enough to call often.

    Looks at most every :data:`REBALANCE_INTERVAL_S` seconds. A job whose threads were given explicitly
    never changes them. When the share changes, ``torch.set_num_threads`` takes it and one line on
    stderr says so.

    Args:
        now: the monotonic clock (default: read it), for tests.

    Returns:
        The new thread count when it changed, else ``None``.
    """
    live = _LIVE
    if live is None or live.plan.threads_from:
        return None
    now = time.monotonic() if now is None else now
    if now < live.next_look:
        return None
    live.next_look = now + REBALANCE_INTERVAL_S
    # The CPUs given do not change while a job runs; only the jobs beside it do, so only they are counted again.
    others = live.jobs.others()
    jobs, why = _jobs_sharing(live.environ, others)
    start = live.plan.budget
    budget = dataclasses.replace(start, jobs=jobs, reasons=(*start.reasons[:-1], why), found=others)
    if budget.per_job == live.plan.threads:
        return None
    import torch

    live.plan = dataclasses.replace(live.plan, budget=budget, threads=budget.per_job)
    torch.set_num_threads(budget.per_job)
    print(f"threads: now {budget.per_job} compute: {budget.reasons[-1]}", file=sys.stderr)
    return budget.per_job


def live_plan() -> ThreadPlan | None:
    """The plan this process's job took (and rebalanced since), or ``None`` outside a job :func:`start_job` began."""
    return _LIVE.plan if _LIVE is not None else None


def end_job() -> None:
    """Leave the folder of live jobs (registered at exit by :func:`start_job`)."""
    global _LIVE
    if _LIVE is not None:
        _LIVE.jobs.close()
        _LIVE = None


def start_job(forced: int | None = None, forced_from: str = "", command: str = "") -> ThreadPlan:
    """Size a job at start-up: the wait policy (before torch loads), then torch's threads.

    Args:
        forced: an explicit thread count (``train.num_threads``, ``--threads``); ``None`` or 0: from the CPUs.
        forced_from: what gave ``forced``, for the start-up line.
        command: the job's command, written in its entry in the folder of live jobs (:class:`HostJobs`).

    Returns:
        The plan taken (no data workers: :func:`with_workers` adds a training job's); :meth:`ThreadPlan.line`
        says it in one line.
    """
    global _LIVE
    environ = os.environ
    jobs = HostJobs(jobs_folder(environ), _affinity()[0])
    others = jobs.others()
    plan = plan_threads(forced, forced_from, cpu_budget(environ, others=others))
    set_wait_policy(plan)
    apply(plan)
    end_job()
    if jobs.register(command):
        import atexit

        _LIVE = _Live(jobs, plan, environ, time.monotonic() + REBALANCE_INTERVAL_S)
        atexit.register(end_job)
    return plan


def with_workers(plan: ThreadPlan, num_workers: int | None, device_type: str) -> ThreadPlan:
    """A training job's plan with its data workers (:func:`data_workers`).

    Args:
        plan: what :func:`start_job` took.
        num_workers: ``train.num_workers``.
        device_type: ``cpu`` or ``cuda``, where it trains.
    """
    return dataclasses.replace(plan, workers=data_workers(num_workers, device_type, plan.budget.per_job))
