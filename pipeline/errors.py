"""User-facing errors: the CLI prints these as one line and exits non-zero."""

from __future__ import annotations

from pathlib import Path


class PipelineError(Exception):
    """An error caused by the user's input or configuration, not by a bug.

    The CLI prints ``str(error)`` as a single line and exits with ``exit_code``.
    """

    exit_code: int = 2


class ConfigError(PipelineError):
    """An invalid configuration: unknown key, wrong type or bad value."""


class InputDataError(PipelineError):
    """A bad input file or folder.

    Args:
        path: the file or folder at fault; it is always named in the message.
        problem: what is wrong with it, in plain words.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
