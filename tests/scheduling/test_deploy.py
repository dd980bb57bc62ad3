"""The scheduler files in deploy/: parseable, and all three make the same ``unet-pipeline run`` call."""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path

import yaml

from pipeline.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
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
