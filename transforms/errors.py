"""Errors for bad input, raised by the readers and transforms: one line naming the file, not a traceback.

They live here, not in ``pipeline/``, so that ``transforms`` stays usable without the
pipeline. :mod:`pipeline.errors` builds its own errors on :class:`UserFacingError` and maps
them all to exit codes.
"""

from __future__ import annotations

from pathlib import Path


class UserFacingError(Exception):
    """An error caused by the user's input, configuration or environment, not by a bug.

    A command line prints ``str(error)`` as a single line and exits with ``exit_code``.
    """

    exit_code: int = 2


class InputDataError(UserFacingError):
    """A bad input file or folder.

    Args:
        path: the file or folder at fault; it is always named in the message.
        problem: what is wrong with it, in plain words.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def short_reason(error: BaseException, path: Path | None = None) -> str:
    """A library error as a short one-line reason (the path, when given, replaced by "it").

    Args:
        error: what a reading library raised.
        path: the file the message may name (it is named once, by the :class:`InputDataError`).
    """
    text = " ".join(str(error).split())
    if path is not None:  # the message already starts with the path
        text = text.replace(f'"{path}"', "it").replace(f"'{path}'", "it").replace(str(path), "it")
    if not text:
        text = type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."
