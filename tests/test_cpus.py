"""Threads and workers from the CPUs a job is given (pipeline/cpus.py): affinity mask, cgroup quota, Slurm, torchrun.

The affinity tests change a real process's mask (``taskset``, ``os.sched_setaffinity``); the cgroup tests read
``cpu.max`` / ``cpu.cfs_quota_us`` files written in a temporary folder laid out like ``/sys/fs/cgroup``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pipeline import cpus
from pipeline.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
#: What would make a child process take other CPUs than its mask says: each test sets what it means to test.
_SIZING_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID",
               "SLURM_CPUS_PER_TASK", cpus.JOBS_ENV, cpus.JOBS_DIR_ENV)

# The CLI under a given environment, then what torch really took (threads) and the wait policy. SIZING_ONLY: only
# the CLI's start-up sizing of the parsed command line (no stage imported: a second instead of several).
PROBE = """
import json, os, sys
from pipeline import cli
from pipeline.cli import commands
if os.environ.pop("SIZING_ONLY", None):
    commands._size_cpus(cli.build_parser().parse_args(sys.argv[1:]))
    code = None
else:
    code = cli.main(sys.argv[1:])
import torch
print(json.dumps({"code": code, "threads": torch.get_num_threads(), "policy": os.environ.get("OMP_WAIT_POLICY")}))
"""


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SIZING_ENV}
    # A folder of live jobs of its own: no job another test left registered in this process counts.
    return {**env, cpus.JOBS_DIR_ENV: tempfile.mkdtemp(prefix="unet-pipeline-jobs-"), **extra}


def _run_cli(env: dict[str, str], tmp_path: Path, cpu: int | None = None, *flags: str) -> tuple[dict, str, str]:
    """``unet-pipeline predict`` of a model that does not exist, under ``taskset -c CPU`` when ``cpu`` is given:
    start-up sizes the job, then the command fails on the model (exit 2). Returns what the probe printed, the
    start-up line and stderr."""
    args = ["predict", "--model", str(tmp_path / "missing.pt"), str(tmp_path), "--out", str(tmp_path / "out"),
            "--work-dir", str(tmp_path / "work"), *flags]
    prefix, pin = [], None
    if cpu is not None and shutil.which("taskset"):
        prefix = ["taskset", "-c", str(cpu)]
    elif cpu is not None:  # taskset is util-linux; the same system call where it is missing
        def pin() -> None:
            os.sched_setaffinity(0, {cpu})
    done = subprocess.run([*prefix, sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=120, preexec_fn=pin)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [x for x in done.stderr.splitlines() if x.startswith("threads: ")]
    assert len(lines) == 1, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), lines[0], done.stderr


def test_a_job_under_taskset_reports_and_uses_the_one_cpu_it_is_given(tmp_path: Path) -> None:
    cpu = min(os.sched_getaffinity(0))
    result, line, _ = _run_cli(_clean_env(), tmp_path, cpu)
    assert line.startswith(f"threads: 1 compute, no data workers: affinity mask {cpu} (1 CPU), "), line
    assert line.endswith(", 1 job on this host"), line
    assert result["threads"] == 1  # what torch used, not only what was said
    assert result["policy"] is None  # a job alone keeps OpenMP's default (spinning is faster for it)
    assert result["code"] == 2  # and the command went on to its own error: the missing model


def test_two_jobs_on_the_host_split_its_cpus_and_their_idle_threads_sleep(tmp_path: Path) -> None:
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    result, line, _ = _run_cli(_clean_env(LOCAL_WORLD_SIZE="2", SIZING_ONLY="1"), tmp_path)
    assert line.startswith(f"threads: {share} compute, no data workers: affinity mask "), line
    assert f"2 jobs on this host (LOCAL_WORLD_SIZE=2): {share} CPU" in line
    assert line.endswith("idle threads sleep (OMP_WAIT_POLICY=PASSIVE: the CPUs are shared)"), line
    assert result["threads"] == share
    assert result["policy"] == "PASSIVE"  # set before torch loaded libgomp


def test_an_explicit_thread_count_wins_over_the_mask(tmp_path: Path) -> None:
    result, line, _ = _run_cli(_clean_env(SIZING_ONLY="1"), tmp_path, min(os.sched_getaffinity(0)), "--threads", "3")
    assert line.startswith("threads: 3 compute (--threads), no data workers: affinity mask "), line
    assert result["threads"] == 3
    assert result["policy"] == "PASSIVE"  # 3 threads on 1 CPU: they share it


@pytest.fixture
def one_cpu() -> Iterator[int]:
    """This test process (its calling thread, which is what ``sched_getaffinity(0)`` reads) pinned to one CPU."""
    before, threads = os.sched_getaffinity(0), torch.get_num_threads()
    cpu = min(before)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)
        torch.set_num_threads(threads)


def test_training_takes_its_threads_and_workers_from_the_mask(one_cpu: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.training.loop import _init_process, _num_workers

    for name in _SIZING_ENV:
        monkeypatch.delenv(name, raising=False)
    torch.set_num_threads(2)
    device, _ = _init_process(TrainConfig(device="cpu"))
    assert torch.get_num_threads() == 1
    assert _num_workers(None, device) == 0  # on a CPU the network needs the core
    assert _num_workers(None, torch.device("cuda")) == 1  # at least one worker feeds a GPU
    _init_process(TrainConfig(device="cpu", num_threads=2))  # train.num_threads still wins
    assert torch.get_num_threads() == 2


def _cgroup_v2(root: Path, path: str, limits: dict[str, str]) -> Path:
    """A cgroup v2 tree under ``root``: ``cpu.max`` per folder; returns the ``/proc/self/cgroup`` file."""
    for folder, value in limits.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "cpu.max").write_text(value + "\n")
    (root / path.strip("/")).mkdir(parents=True, exist_ok=True)
    proc = root.parent / "proc-self-cgroup"
    proc.write_text(f"0::{path}\n")
    return proc


def test_a_cgroup_v2_quota_limits_the_threads(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    proc = _cgroup_v2(root, "/kubepods/pod1/ctr", {"kubepods/pod1/ctr": "100000 100000", "kubepods": "max 100000"})
    assert cpus.cgroup_quota(root, proc) == (1.0, "cpu.max 100000 100000")
    budget = cpus.cpu_budget({}, root, proc)
    assert budget.given == 1 and "cgroup quota 1 CPUs (cpu.max 100000 100000)" in budget.reasons
    assert cpus.plan_threads(budget=budget, environ={}).threads == 1  # a job that ignored the quota would take more


def test_a_parents_quota_applies_and_a_fraction_rounds_up(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    proc = _cgroup_v2(root, "/a/b", {"a": "150000 100000", "a/b": "max 100000"})
    assert cpus.cgroup_quota(root, proc) == (1.5, "cpu.max 150000 100000")
    assert cpus.cpu_budget({}, root, proc).given == min(2, len(os.sched_getaffinity(0)))


def test_inside_a_container_the_mounts_own_limit_is_read(tmp_path: Path) -> None:
    # Without a cgroup namespace /proc/self/cgroup names the host's path, absent under the container's mount.
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cpu.max").write_text("50000 100000\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("0::/system.slice/docker-abc.scope\n")
    assert cpus.cgroup_quota(root, proc) == (0.5, "cpu.max 50000 100000")
    assert cpus.cpu_budget({}, root, proc).given == 1


def test_a_cgroup_v1_quota_and_no_quota(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    job = root / "cpu,cpuacct" / "slurm" / "job_7"
    job.mkdir(parents=True)
    (job / "cpu.cfs_quota_us").write_text("200000\n")
    (job / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("12:memory:/slurm/job_7\n4:cpu,cpuacct:/slurm/job_7\n0::/\n")
    assert cpus.cgroup_quota(root, proc) == (2.0, "cpu.cfs_quota_us 200000 / cpu.cfs_period_us 100000")
    (job / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpus.cgroup_quota(root, proc) is None
    assert "no cgroup quota" in cpus.cpu_budget({}, root, proc).reasons
    assert cpus.cgroup_quota(tmp_path / "absent", tmp_path / "absent-too") is None


def test_slurm_cpus_per_task_and_the_jobs_on_the_host(tmp_path: Path) -> None:
    none = tmp_path / "none"
    budget = cpus.cpu_budget({"SLURM_CPUS_PER_TASK": "1"}, none, none)
    assert budget.given == 1 and "SLURM_CPUS_PER_TASK=1" in budget.reasons
    budget = cpus.cpu_budget({"LOCAL_WORLD_SIZE": "2"}, none, none)
    assert budget.jobs == 2 and budget.reasons[-1] == "2 jobs on this host (LOCAL_WORLD_SIZE=2)"
    budget = cpus.cpu_budget({cpus.JOBS_ENV: "5"}, none, none)
    assert budget.jobs == 5 and budget.reasons[-1] == f"5 jobs on this host ({cpus.JOBS_ENV}=5)"
    assert cpus.cpu_budget({cpus.JOBS_ENV: "zero"}, none, none).jobs == 1  # not a count: ignored
    # floor(cpus / jobs), at least 1
    assert cpus.CpuBudget(16, 5, ()).per_job == 3
    assert cpus.CpuBudget(2, 5, ()).per_job == 1


def test_an_explicit_count_wins_and_omp_num_threads_counts_outside_torchrun() -> None:
    small = cpus.CpuBudget(2, 1, ("x",))
    plan = cpus.plan_threads(4, "train.num_threads", small, {})
    assert (plan.threads, plan.threads_from, plan.passive) == (4, "train.num_threads", True)  # 4 threads, 2 CPUs
    assert cpus.plan_threads(0, "train.num_threads", small, {}).threads == 2  # 0: from the CPUs
    plan = cpus.plan_threads(None, "", cpus.CpuBudget(8, 1, ()), {"OMP_NUM_THREADS": "3"})
    assert (plan.threads, plan.threads_from, plan.passive) == (3, "OMP_NUM_THREADS", False)
    # torchrun sets OMP_NUM_THREADS=1 for its processes itself: the share of the CPUs counts there
    plan = cpus.plan_threads(None, "", cpus.CpuBudget(8, 2, ()), {"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (plan.threads, plan.threads_from, plan.passive) == (4, "", True)


def test_the_wait_policy_is_never_set_over_the_users_nor_for_a_job_alone() -> None:
    shared = cpus.ThreadPlan(cpus.CpuBudget(2, 2, ()), 1, passive=True)
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert not cpus.set_wait_policy(shared, env) and env == {"OMP_WAIT_POLICY": "ACTIVE"}
    alone: dict[str, str] = {}
    assert not cpus.set_wait_policy(cpus.ThreadPlan(cpus.CpuBudget(2, 1, ()), 2), alone) and alone == {}
    # torch is loaded in this process: too late for libgomp to read it, so it is not pretended to be set
    late: dict[str, str] = {}
    assert not cpus.set_wait_policy(shared, late) and late == {}


def test_the_start_up_line_says_threads_workers_and_why() -> None:
    budget = cpus.CpuBudget(4, 2, ("affinity mask 0-3 (4 CPUs)", "no cgroup quota",
                                   "2 jobs on this host (LOCAL_WORLD_SIZE=2)"))
    line = cpus.ThreadPlan(budget, 2, "", 1, True).line({"OMP_WAIT_POLICY": "PASSIVE"})
    assert line == ("threads: 2 compute, 1 data worker (1 thread each): affinity mask 0-3 (4 CPUs), no cgroup quota, "
                    "2 jobs on this host (LOCAL_WORLD_SIZE=2): 2 CPUs each; idle threads sleep "
                    "(OMP_WAIT_POLICY=PASSIVE: the CPUs are shared)")
    line = cpus.ThreadPlan(cpus.CpuBudget(2, 1, ("1 job on this host",)), 2, "", 0).line({})
    assert line == "threads: 2 compute, 0 data workers (augmentation runs in this process): 1 job on this host"
    assert cpus._ranges({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"


def test_data_workers_and_their_single_thread() -> None:
    assert cpus.data_workers(3, "cpu", 2) == 3  # train.num_workers wins
    assert cpus.data_workers(None, "cpu", 16) == 0
    assert [cpus.data_workers(None, "cuda", n) for n in (1, 2, 4, 32)] == [1, 1, 3, cpus.MAX_GPU_WORKERS]
    from pipeline.training.patches import PatchStream, patch_loader

    stream = PatchStream([], None, 0, 0, 2)
    assert patch_loader(stream, 0, 1, 2, 2, False).worker_init_fn is cpus.single_threaded_worker
    assert patch_loader(stream, 0, 1, 2, 0, False).worker_init_fn is None


def test_the_concurrency_benchmark_runs_both_ways_and_tells_the_jobs_they_share(tmp_path: Path) -> None:
    script = [sys.executable, str(REPO / "scripts" / "bench_concurrency.py"), "--jobs", "2", "--repeats", "2"]
    job = ["sh", "-c", 'echo "threads: $UNET_PIPELINE_JOBS jobs, this is {job}" >&2; '
           'printf "1.5 patches/s\\r{job}.25 patches/s\\n" >&2']
    done = subprocess.run([*script, "--json", str(tmp_path / "b.json"), "--rate", "([0-9.]+) patches/s", "--", *job],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "b.json").read_text())
    assert {k: len(v) for k, v in result["walls_s"].items()} == {"at once": 2, "one after the other": 2}
    assert sorted(result["thread_lines"]["at once"]) == ["threads: 2 jobs, this is 0", "threads: 2 jobs, this is 1"]
    assert sorted(result["thread_lines"]["one after the other"]) == ["threads:  jobs, this is 0",
                                                                     "threads:  jobs, this is 1"]
    assert result["ratio_of_medians"] > 0 and "ratio" in done.stdout
    # the last rate each job printed: 0.25 and 1.25, summed at once, averaged one after the other
    assert result["rates"] == {"at once": [1.5, 1.5], "one after the other": [0.75, 0.75]}
    failed = subprocess.run([*script, "--", "sh", "-c", "exit 3"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert failed.returncode != 0 and "exited 3" in failed.stderr


def _register(folder: Path, cpu_set: set[int], command: str = "run") -> cpus.HostJobs:
    jobs = cpus.HostJobs(folder, cpu_set)
    assert jobs.register(command)
    return jobs


def test_live_jobs_count_where_their_cpus_overlap_and_a_killed_job_drops_out(tmp_path: Path) -> None:
    folder = tmp_path / "jobs"
    a, b, far = _register(folder, {0, 1}), _register(folder, {1, 2}, "predict"), _register(folder, {7})
    assert oct(folder.stat().st_mode & 0o7777) == oct(0o1777)  # shared by the users of the host, like /tmp
    assert json.loads(b.path.read_text()) == {"pid": os.getpid(), "command": "predict", "cpus": [1, 2]}
    assert (a.others(), b.others(), far.others()) == (1, 1, 0)
    # A job killed outright (no exit handler runs) leaves its file; the kernel dropped its lock, so it is stale.
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from pipeline import cpus; "
         f"job = cpus.HostJobs(Path({str(folder)!r}), {{0}}); assert job.register('predict'); print('ready', flush=True); "
         "time.sleep(60)"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert a.others() == 2 and len(list(folder.glob("*.job"))) == 4
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        assert len(list(folder.glob("*.job"))) == 4  # still there: nothing removed it on the way out
        assert a.others() == 1 and len(list(folder.glob("*.job"))) == 3  # found stale and removed
    finally:
        child.kill()
    b.close()
    assert a.others() == 0 and b.path is None and len(list(folder.glob("*.job"))) == 2
    assert not cpus.HostJobs(Path("/proc/no-such-folder"), {0}).register("run")  # unusable: the job runs alone


@pytest.fixture
def two_cpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[set[int]]:
    """This process pinned to two CPUs, with no sizing from the environment and its own folder of live jobs."""
    before, threads = os.sched_getaffinity(0), torch.get_num_threads()
    if len(before) < 2:
        pytest.skip(f"needs 2 CPUs to split between two jobs, this process may use {len(before)}")
    for name in _SIZING_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(cpus.JOBS_DIR_ENV, str(tmp_path / "jobs"))
    pair = set(sorted(before)[:2])
    os.sched_setaffinity(0, pair)
    try:
        yield pair
    finally:
        cpus.end_job()
        os.sched_setaffinity(0, before)
        torch.set_num_threads(threads)


def test_a_job_takes_its_share_as_undeclared_jobs_start_and_end_beside_it(
    two_cpus: set[int], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tmp_path / "jobs"
    other = _register(folder, {min(two_cpus)})  # e.g. the nightly run, started without UNET_PIPELINE_JOBS
    plan = cpus.start_job(command="predict")
    assert (plan.threads, plan.budget.jobs, torch.get_num_threads()) == (1, 2, 1)
    assert plan.line().endswith("2 jobs on this host (1 other unet-pipeline job found running on these CPUs): "
                                "1 CPU each"), plan.line()
    assert not plan.passive  # the jobs found take one share each: their threads together fit the CPUs
    assert len(list(folder.glob("*.job"))) == 2  # this job is in the folder for the next one to see
    other.close()
    now = time.monotonic()
    assert cpus.rebalance(now) is None and torch.get_num_threads() == 1  # looked less than 2 s ago: not yet
    assert cpus.rebalance(now + cpus.REBALANCE_INTERVAL_S) == 2 and torch.get_num_threads() == 2
    assert "threads: now 2 compute: 1 job on this host" in capsys.readouterr().err
    assert cpus.rebalance(now + 2 * cpus.REBALANCE_INTERVAL_S) is None  # nothing changed: nothing said
    again = _register(folder, set(two_cpus))
    assert cpus.rebalance(now + 3 * cpus.REBALANCE_INTERVAL_S) == 1 and torch.get_num_threads() == 1
    assert cpus.live_plan().threads == 1
    # Only the jobs are counted again: the CPUs given and what said so are the start-up's.
    assert cpus.live_plan().budget.given == plan.budget.given == 2
    assert cpus.live_plan().budget.reasons[:-1] == plan.budget.reasons[:-1]
    assert cpus.live_plan().budget.found == 1
    again.close()
    cpus.end_job()
    assert list(folder.glob("*.job")) == []  # a job that ends leaves the folder


def test_an_explicit_count_is_kept_whatever_runs_beside_it(two_cpus: set[int], tmp_path: Path) -> None:
    other = _register(tmp_path / "jobs", set(two_cpus))
    plan = cpus.start_job(2, "--threads", "predict")
    assert plan.threads == 2 and torch.get_num_threads() == 2
    other.close()
    _register(tmp_path / "jobs", set(two_cpus))
    assert cpus.rebalance(time.monotonic() + 10) is None and torch.get_num_threads() == 2


def test_the_cli_started_beside_a_running_job_says_it_and_takes_its_share(tmp_path: Path) -> None:
    given = os.sched_getaffinity(0)
    folder = tmp_path / "jobs"
    other = _register(folder, set(given))
    result, line, _ = _run_cli(_clean_env(SIZING_ONLY="1", **{cpus.JOBS_DIR_ENV: str(folder)}), tmp_path)
    share = max(1, len(given) // 2)
    assert "2 jobs on this host (1 other unet-pipeline job found running on these CPUs)" in line, line
    assert result["threads"] == share
    other.close()
    result, line, _ = _run_cli(_clean_env(SIZING_ONLY="1", **{cpus.JOBS_DIR_ENV: str(folder)}), tmp_path)
    assert line.endswith(", 1 job on this host") and result["threads"] == len(given), line
    assert list(folder.glob("*.job")) == []  # both probes left the folder as they ended
