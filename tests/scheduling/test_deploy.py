"""The scheduler files in deploy/: parseable, and all of them make the call the docs document.

The nightly schedulers (cron, systemd, Kubernetes CronJob) make the same ``unet-pipeline run`` call; the
cluster examples (Slurm array, Slurm multi-node DDP, Kubernetes Indexed Job) are run by ``bash`` with
``srun``/``scontrol`` stubbed, so what they would start is what the shell really expands, and that is
compared, fold by fold, with the command in the docs/clusters.md block marked ``<!-- deploy: FILE -->``.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.cli import build_parser
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PAGE = ROOT / "docs" / "clusters.md"  # the page that documents the cluster examples
CALL = ["run", "configs/hippocampus.yaml", "--work-dir", "/srv/unet/work"]
APP_DIR = "/srv/unet"


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)  # strict: a repeated key is an error
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def _after_program(tokens: list[str]) -> list[str]:
    """The arguments after the ``unet-pipeline`` program, up to a shell redirection."""
    start = next(i for i, t in enumerate(tokens) if Path(t).name == "unet-pipeline")
    args = tokens[start + 1:]
    return args[: args.index(">>")] if ">>" in args else args


def _cron_job() -> tuple[list[str], list[str]]:
    lines = [line for line in (DEPLOY / "crontab").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert len(lines) == 1, lines
    fields = lines[0].split(maxsplit=5)
    return fields[:5], shlex.split(fields[5])


def test_crontab_runs_nightly_at_two() -> None:
    schedule, command = _cron_job()
    assert schedule == ["0", "2", "*", "*", "*"]
    assert command[:3] == ["cd", APP_DIR, "&&"]
    assert command[3] == ".venv/bin/unet-pipeline"
    assert command[-3:] == [">>", "/var/log/unet-pipeline.log", "2>&1"]
    assert "exit code" in (DEPLOY / "crontab").read_text().lower()


def test_systemd_units() -> None:
    service = _unit(DEPLOY / "systemd" / "unet-pipeline.service")
    timer = _unit(DEPLOY / "systemd" / "unet-pipeline.timer")
    assert service["Service"]["Type"] == "oneshot"
    assert service["Service"]["WorkingDirectory"] == APP_DIR
    assert shlex.split(service["Service"]["ExecStart"])[0] == f"{APP_DIR}/.venv/bin/unet-pipeline"
    assert "SuccessExitStatus" not in service["Service"]
    assert any(re.search(r"\b3 = lock held", line) for line in (DEPLOY / "systemd" / "unet-pipeline.service").open())
    assert timer["Timer"]["OnCalendar"] == "*-*-* 02:00:00"
    assert timer["Timer"]["Persistent"] == "true"
    assert timer["Timer"]["Unit"] == "unet-pipeline.service"
    assert timer["Install"]["WantedBy"] == "timers.target"


def _manifests() -> dict[str, dict]:
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "cronjob.yaml").read_text()))
    return {doc["kind"]: doc for doc in docs if doc}


def test_cronjob_forbids_concurrency_and_keeps_the_work_dir_on_a_claim() -> None:
    docs = _manifests()
    cronjob = docs["CronJob"]
    assert cronjob["apiVersion"] == "batch/v1"
    spec = cronjob["spec"]
    assert spec["schedule"] == "0 2 * * *"
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert any(e["name"] == "MLFLOW_TRACKING_URI" and e["value"].startswith("http") for e in container["env"])
    work_dir = container["command"][container["command"].index("--work-dir") + 1]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == work_dir)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert docs["PersistentVolumeClaim"]["metadata"]["name"] == claim
    assert not mount.get("readOnly", False)
    assert container["workingDir"] == APP_DIR
    # A held lock (exit 3) or a bad config (exit 2) is not retried.
    fail_codes = spec["jobTemplate"]["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"]
    assert {2, 3} <= set(fail_codes)
    rules = spec["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
    assert all("status" in c for r in rules for c in r.get("onPodConditions", []))  # required by the API


def test_the_three_schedulers_make_the_same_call_and_the_cli_accepts_it() -> None:
    _, cron = _cron_job()
    systemd = shlex.split(_unit(DEPLOY / "systemd" / "unet-pipeline.service")["Service"]["ExecStart"])
    cronjob = _manifests()["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    calls = [_after_program(cron), _after_program(systemd), _after_program(cronjob)]
    assert calls == [CALL, CALL, CALL]
    args = build_parser().parse_args(CALL)
    assert args.config == "configs/hippocampus.yaml"
    assert str(args.work_dir) == "/srv/unet/work"
    # The config is relative to the application folder each scheduler starts in.
    assert (Path(__file__).resolve().parents[2] / CALL[1]).is_file()



# --- Cluster examples -------------------------------------------------------------------------------------

NUM_FOLDS = load_config(ROOT / "configs" / "hippocampus.yaml").data.num_folds  # the default when the file leaves it
SHARED_WORK = "/shared/unet/work"
# sbatch's long options used in deploy/slurm, each with the form its value must have (sbatch(1)).
_INT = r"[1-9]\d*"
SBATCH_VALUES = {
    "job-name": r"[\w.-]+", "array": r"\d+(-\d+)?(,\d+(-\d+)?)*(%\d+)?", "nodes": _INT + r"(-\d+)?",
    "ntasks": _INT, "ntasks-per-node": _INT, "cpus-per-task": _INT, "gpus-per-task": r"(\w+:)?" + _INT,
    "gpus-per-node": r"(\w+:)?" + _INT, "gres": r"gpu(:\w+)?(:\d+)?", "mem": r"\d+[KMGT]?",
    "time": r"(\d+-)?\d{1,2}(:\d{2}){0,2}", "output": r"[\w.%/-]+", "error": r"[\w.%/-]+",
    "partition": r"[\w,-]+", "account": r"[\w-]+", "qos": r"[\w-]+",
}
HEAD, NODES, JOB_ID = "gpu-a01", "2", "4242"


def _sbatch_options(path: Path) -> dict[str, str]:
    """The ``#SBATCH --name=value`` lines, checked; sbatch reads them only before the script's first command."""
    options: dict[str, str] = {}
    started = False
    for line in path.read_text().splitlines()[1:]:
        started = started or bool(line.strip() and not line.startswith("#"))
        if not line.lstrip().startswith("#SBATCH"):
            continue
        assert not started, f"{path.name}: sbatch ignores an #SBATCH line after the first command: {line!r}"
        match = re.fullmatch(r"#SBATCH --([a-z-]+)=(\S+)\s*(#.*)?", line)
        assert match, f"{path.name}: not an '#SBATCH --option=value' line: {line!r}"
        name, value = match.group(1), match.group(2)
        assert name in SBATCH_VALUES, f"{path.name}: unknown sbatch option --{name}"
        assert re.fullmatch(SBATCH_VALUES[name], value), f"{path.name}: bad value for --{name}: {value!r}"
        assert name not in options, f"{path.name}: --{name} given twice"
        options[name] = value
    return options


def _run_sbatch_script(path: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, list[str], str]:
    """Run the batch script in bash as Slurm would on the first node, with ``srun`` and ``scontrol`` stubbed.

    Returns the finished shell, the argv ``srun`` got (NUL-separated by the stub, so quoting shows) and the
    folder the script changed to.
    """
    stubs = (
        'cd() { printf "%s" "$1" > "$CD_TO"; }\n'
        'srun() { printf "%s\\0" "$@"; }\n'
        'scontrol() { [ "$1 $2 $3" = "show hostnames $SLURM_JOB_NODELIST" ] && printf "%s\\n" gpu-a01 gpu-a02; }\n'
        '. "$1"\n'
    )
    cd_to = Path(env["CD_TO"])
    res = subprocess.run(["bash", "--norc", "--noprofile", "-c", stubs, "bash", str(path)],
                         env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
                         capture_output=True, text=True, timeout=60)
    return res, res.stdout.split("\0")[:-1], cd_to.read_text() if cd_to.is_file() else ""


def _documented(marker: str) -> tuple[list[str], list[str]]:
    """The docs/clusters.md block under ``<!-- deploy: MARKER -->``: its submit command and the command a task runs."""
    text = PAGE.read_text()
    match = re.search(rf"<!-- deploy: {re.escape(marker)} -->\s*```bash\n(.*?)```", text, re.S)
    assert match, f"docs/clusters.md has no ```bash block right after '<!-- deploy: {marker} -->'"
    lines = [shlex.split(line, comments=True) for line in match.group(1).replace("\\\n", " ").splitlines()]
    lines = [tokens for tokens in lines if tokens]
    submit = next(tokens for tokens in lines if tokens[0] in ("sbatch", "kubectl"))
    assert f"deploy/{marker}" in submit and (DEPLOY / marker).is_file(), submit
    return submit, lines[-1]


def _from_program(tokens: list[str], program: str) -> list[str]:
    start = next(i for i, t in enumerate(tokens) if Path(t).name == program)
    return [program, *tokens[start + 1:]]


@pytest.fixture
def slurm_env(tmp_path: Path) -> dict[str, str]:
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    return {"MLFLOW_TRACKING_URI": "http://mlflow.internal:5000", "CD_TO": str(tmp_path / "cd"),
            "SLURM_JOB_ID": JOB_ID, "SLURM_NNODES": NODES, "SLURM_JOB_NODELIST": "gpu-a[01-02]"}


@pytest.mark.parametrize("script", ["folds.sbatch", "ddp.sbatch"])
def test_slurm_scripts_are_valid_batch_scripts(script: str) -> None:
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    path = DEPLOY / "slurm" / script
    assert path.read_text().startswith("#!/bin/bash\n")
    res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    options = _sbatch_options(path)
    assert {"job-name", "time", "output"} <= set(options)
    if script == "folds.sbatch":
        assert options["array"] == f"0-{NUM_FOLDS - 1}"  # one task per fold of the config, no more
        assert options["nodes"] == "1" and options["ntasks"] == "1"
    else:
        assert "array" not in options
        assert int(options["nodes"]) >= 2 and options["ntasks-per-node"] == "1"  # one torchrun per node


def test_slurm_array_runs_the_documented_command_for_each_fold(slurm_env: dict[str, str]) -> None:
    _, documented = _documented("slurm/folds.sbatch")
    for fold in range(NUM_FOLDS):
        res, srun, cd_to = _run_sbatch_script(DEPLOY / "slurm" / "folds.sbatch",
                                              {**slurm_env, "SLURM_ARRAY_TASK_ID": str(fold)})
        assert res.returncode == 0, res.stderr
        assert cd_to == APP_DIR and srun[0] == ".venv/bin/unet-pipeline"
        call = _after_program(srun)
        assert call == _after_program([str(fold) if t == "K" else t for t in documented])
        args = build_parser().parse_args(call)
        assert (args.command, args.config, args.fold, str(args.work_dir)) == (
            "run", "configs/hippocampus.yaml", fold, SHARED_WORK)
    assert (ROOT / "configs" / "hippocampus.yaml").is_file()


def test_slurm_scripts_refuse_to_start_without_a_tracking_server(slurm_env: dict[str, str]) -> None:
    # Without MLFLOW_TRACKING_URI every fold would write WORK_DIR/mlflow.db: SQLite over NFS, from 5 nodes.
    env = {k: v for k, v in slurm_env.items() if k != "MLFLOW_TRACKING_URI"}
    for script in ("folds.sbatch", "ddp.sbatch"):
        res, srun, _ = _run_sbatch_script(DEPLOY / "slurm" / script, {**env, "SLURM_ARRAY_TASK_ID": "0"})
        assert res.returncode != 0 and srun == []
        assert "MLFLOW_TRACKING_URI" in res.stderr


def test_slurm_ddp_starts_torchrun_on_every_node_as_documented(slurm_env: dict[str, str]) -> None:
    from torch.distributed.run import get_args_parser

    res, srun, cd_to = _run_sbatch_script(DEPLOY / "slurm" / "ddp.sbatch", slurm_env)
    assert res.returncode == 0, res.stderr
    assert cd_to == APP_DIR
    # srun ends every node's torchrun when one of them fails (a lost node: exit 11 on the others).
    assert srun[: srun.index(".venv/bin/torchrun")] == ["--kill-on-bad-exit=1"]
    _, documented = _documented("slurm/ddp.sbatch")
    placeholders = {"NODES": NODES, "HEAD": HEAD, "JOB_ID": JOB_ID}
    expected = [re.sub(r"\b(NODES|HEAD|JOB_ID)\b", lambda m: placeholders[m.group(1)], t) for t in documented]
    assert _from_program(srun, "torchrun") == _from_program(expected, "torchrun")
    launch = get_args_parser().parse_args(_from_program(srun, "torchrun")[1:])
    assert launch.nnodes == NODES and launch.nproc_per_node == "gpu"
    assert launch.rdzv_backend == "c10d" and launch.rdzv_endpoint == f"{HEAD}:29500"  # the job's first node
    assert launch.rdzv_id == JOB_ID and launch.module and launch.training_script == "pipeline"
    args = build_parser().parse_args(launch.training_script_args)
    assert (args.command, args.config, str(args.work_dir)) == ("run", "configs/hippocampus.yaml", SHARED_WORK)


def _folds_job() -> dict[str, dict]:
    docs = [doc for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / "folds-job.yaml").read_text()) if doc]
    assert len({doc["kind"] for doc in docs}) == len(docs)
    return {doc["kind"]: doc for doc in docs}


def test_kubernetes_indexed_job_is_well_formed() -> None:
    docs = _folds_job()
    assert {k: d["apiVersion"] for k, d in docs.items()} == {
        "PersistentVolumeClaim": "v1", "ConfigMap": "v1", "Job": "batch/v1"}
    spec = docs["Job"]["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == NUM_FOLDS
    # A failing fold stops only itself (FailIndex needs backoffLimitPerIndex and restartPolicy Never).
    assert spec["backoffLimitPerIndex"] >= 1
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailIndex" and {2, 3, 4} <= set(rules[0]["onExitCodes"]["values"])
    assert all("status" in c for r in rules for c in r.get("onPodConditions", []))  # required by the API
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["workingDir"] == APP_DIR
    env = {e["name"]: e for e in container["env"]}
    # The fold: the completion index, which the kubelet expands in the command as $(JOB_COMPLETION_INDEX).
    assert env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    uri = env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]
    assert docs["ConfigMap"]["metadata"]["name"] == uri["name"]
    assert docs["ConfigMap"]["data"][uri["key"]].startswith("http")
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert env[name]["valueFrom"]["secretKeyRef"]["optional"] is True
    # The work directory: one ReadWriteMany claim, mounted writable at --work-dir in every pod.
    work_dir = container["command"][container["command"].index("--work-dir") + 1]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == work_dir)
    assert not mount.get("readOnly", False)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claim = docs["PersistentVolumeClaim"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_kubernetes_indexed_job_runs_the_documented_command_for_each_fold() -> None:
    command = _folds_job()["Job"]["spec"]["template"]["spec"]["containers"][0]["command"]
    _, documented = _documented("kubernetes/folds-job.yaml")
    for fold in range(NUM_FOLDS):
        # The kubelet's $(VAR) expansion, for the index the Job controller gives pod ``fold``.
        call = _after_program([t.replace("$(JOB_COMPLETION_INDEX)", str(fold)) for t in command])
        assert call == _after_program([str(fold) if t == "K" else t for t in documented])
        args = build_parser().parse_args(call)
        assert (args.command, args.config, args.fold, str(args.work_dir)) == (
            "run", "configs/hippocampus.yaml", fold, "/srv/unet/work")
