"""The shell tour of docs/getting-started.md runs as written, and prints what the page says it prints.

Every ```console block of the page is a list of ``$ COMMAND`` lines, each followed by the lines it prints on
stdout. The commands run one after the other in a fresh folder, with the project's ``unet-pipeline`` on the PATH;
``unet-pipeline run`` gets a training budget of seconds (the only change to what the page says). A command that
fails, or whose printed lines differ in words or structure from the page's, fails the test; numbers, run ids and
the parts the page writes ``...`` may differ.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO

PAGE = REPO / "docs" / "getting-started.md"
# Seconds of training instead of the demo's 3 minutes; 8 synthetic cases instead of 24 (2 held out).
FAST_RUN = ["--set", "train.time_budget_minutes=0.05", "--set", "data.synthetic_cases=8", "--set",
            "train.val_every=1000", "--set", "registry.compile_ahead_of_time=false"]
_LOOSE = re.compile(r"(\.\.\.|[0-9a-f]{32}|\d+(?:\.\d+)?|\s+)")
_NUMBER = r"(?:[-+]?(?:\d+(?:\.\d+)?|nan|inf))"


@dataclass
class Step:
    """One ``$ COMMAND`` of the page and the lines it is shown printing."""

    command: str
    expected: list[str] = field(default_factory=list)


def page_steps(text: str) -> list[Step]:
    """The commands of the page's console blocks, in order, with their shown output (blank lines dropped).

    Args:
        text: the page's Markdown.
    """
    steps: list[Step] = []
    for block in re.findall(r"```console\n(.*?)```", text, re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append(Step(line[2:].strip()))
            elif line.strip():
                assert steps, f"output before any command in a console block of {PAGE.name}: {line!r}"
                steps[-1].expected.append(line.rstrip())
    return steps


def line_pattern(expected: str) -> re.Pattern:
    """A shown line as a pattern: its words exactly, any number for a number, anything for ``...``.

    Args:
        expected: a line as the page shows it.
    """
    parts = []
    for token in _LOOSE.split(expected.strip()):
        if token == "...":
            parts.append(".*?")
        elif re.fullmatch(r"[0-9a-f]{32}", token):
            parts.append("[0-9a-f]{32}")
        elif re.fullmatch(r"\d+(?:\.\d+)?", token):
            parts.append(_NUMBER)
        elif token and token.isspace():
            parts.append(r"\s+")
        elif token:
            parts.append(re.escape(token))
    return re.compile("".join(parts))


def drift(expected: list[str], printed: str) -> list[str]:
    """How the printed lines differ from the shown ones (empty: they agree).

    Args:
        expected: the lines the page shows.
        printed: what the command printed on stdout.
    """
    actual = [line.rstrip() for line in printed.splitlines() if line.strip()]
    problems = [f"shown {len(expected)} line(s), printed {len(actual)}"] if len(actual) != len(expected) else []
    for shown, got in zip(expected, actual):
        if not line_pattern(shown).fullmatch(got.strip()):
            problems.append(f"shown   {shown.strip()!r}\n    printed {got.strip()!r}")
    return problems


def test_the_drift_check_sees_a_changed_word_and_a_missing_line() -> None:
    shown = ["Dice per label on 6 held-out case(s):", "Open the MLflow UI: mlflow ui --backend-store-uri sqlite:///..."
             "/mlflow.db  (then http://127.0.0.1:5000)"]
    assert not drift(shown, "\nDice per label on 2 held-out case(s):\nOpen the MLflow UI: mlflow ui "
                            "--backend-store-uri sqlite:////tmp/x/mlflow.db  (then http://127.0.0.1:5000)\n")
    assert drift(shown, "Dice per label on 2 validation case(s):\nOpen the MLflow UI: mlflow ui --backend-store-uri "
                        "sqlite:////tmp/x/mlflow.db  (then http://127.0.0.1:5000)\n")
    assert drift(shown, "Dice per label on 2 held-out case(s):\n")


def test_the_page_shows_the_tour() -> None:
    commands = [s.command for s in page_steps(PAGE.read_text())]
    assert [c.split()[1] for c in commands if c.startswith("unet-pipeline")] == ["run", "run", "predict", "worklist"]
    assert all(s.expected for s in page_steps(PAGE.read_text())), "every command shows what it prints"


@pytest.mark.slow
def test_the_getting_started_commands_run_and_print_what_the_page_shows(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(REPO),
               UNET_PIPELINE_CACHE=str(tmp_path / "cache"))
    folder = tmp_path / "tour"
    folder.mkdir()
    for step in page_steps(PAGE.read_text()):
        command = step.command
        if command.startswith("unet-pipeline run"):
            command += " " + " ".join(FAST_RUN)
        done = subprocess.run(["bash", "-c", command], cwd=folder, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"$ {command}\nexit {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        problems = drift(step.expected, done.stdout)
        assert not problems, f"$ {step.command}: printed lines drift from {PAGE.name}:\n  " + "\n  ".join(problems)
