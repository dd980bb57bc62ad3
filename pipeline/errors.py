"""User-facing errors and the exit codes they map to: the CLI prints these as one line and exits non-zero.

Exit codes are part of the interface (cron, systemd and Kubernetes act on them) and
are listed in docs/scheduling.md and docs/troubleshooting.md:

====  ==========================================================================
code  meaning
====  ==========================================================================
0     success (also: nothing to do, everything is up to date)
2     bad input or configuration (the file or key is named)
3     another call holds the work directory's lock
4     training failed or diverged (NaN/Inf loss)
5     the MLflow tracking server cannot be reached
6     the new model was registered but not promoted (only with ``--fail-if-not-promoted``)
7     the PACS cannot be reached
8     the PACS refused the credentials
9     the PACS rejected the stored DICOM SEG
10    a batch finished, but some of its items failed (each one reported)
11    a distributed training lost one of its processes (a node died or hung); rerunning resumes
130   interrupted (Ctrl-C / SIGINT)
====  ==========================================================================
"""

from __future__ import annotations

from transforms.errors import InputDataError as InputDataError  # re-exported: raised by the readers
from transforms.errors import UserFacingError

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_LOCKED = 3
EXIT_TRAINING_FAILED = 4
EXIT_TRACKING_UNAVAILABLE = 5
EXIT_NOT_PROMOTED = 6
EXIT_PACS_UNAVAILABLE = 7
EXIT_PACS_AUTH = 8
EXIT_PACS_REJECTED = 9
EXIT_PARTIAL_FAILURE = 10
EXIT_PEER_LOST = 11
EXIT_INTERRUPTED = 130


class PipelineError(UserFacingError):
    """An error caused by the user's input, configuration or environment, not by a bug.

    The CLI prints ``str(error)`` as a single line and exits with ``exit_code``.
    """

    exit_code: int = EXIT_BAD_INPUT


class ConfigError(PipelineError):
    """An invalid configuration: unknown key, wrong type or bad value."""


class LockHeldError(PipelineError):
    """Another process holds the work directory's lock."""

    exit_code = EXIT_LOCKED


class TrainingFailedError(PipelineError):
    """Training failed or diverged (a NaN/Inf loss)."""

    exit_code = EXIT_TRAINING_FAILED


class TrackingUnavailableError(PipelineError):
    """The MLflow tracking server cannot be reached."""

    exit_code = EXIT_TRACKING_UNAVAILABLE


class NotPromotedError(PipelineError):
    """The candidate was registered but did not take ``champion`` (only with ``--fail-if-not-promoted``)."""

    exit_code = EXIT_NOT_PROMOTED


class PacsUnavailableError(PipelineError):
    """The PACS (DICOMweb server) cannot be reached."""

    exit_code = EXIT_PACS_UNAVAILABLE


class PacsAuthError(PipelineError):
    """The PACS refused the credentials (HTTP 401/403)."""

    exit_code = EXIT_PACS_AUTH


class PacsRejectedError(PipelineError):
    """The PACS rejected the stored object (STOW-RS failure)."""

    exit_code = EXIT_PACS_REJECTED


class PartialFailureError(PipelineError):
    """A batch finished but some items failed; each was reported on its own line."""

    exit_code = EXIT_PARTIAL_FAILURE


class PeerLostError(PipelineError):
    """A ``torchrun`` job lost one of its processes (a node died, was killed or stopped answering)."""

    exit_code = EXIT_PEER_LOST


def user_error(exc: BaseException) -> UserFacingError | None:
    """The user-facing error behind ``exc``, or None.

    A :class:`PipelineError` or a reader's ``InputDataError``; MONAI's ``Compose`` re-raises
    transform errors wrapped, hence the walk along the exception chain.

    Args:
        exc: the exception caught.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, UserFacingError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
