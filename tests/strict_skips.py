"""Skips that fail the run where everything a test needs must be there (``UNET_TESTS_STRICT``, set by ``make test``
in CI).

A test skips when what it needs is missing here: the shared data, Orthanc, Chromium, PostgreSQL, a C++ compiler.
On a developer's machine that is the right answer (the reason says what to install). In CI it is not: a skipped
test passes the run, so a CI image that lost Orthanc would go green without a single PACS test. With the variable
set, every skip (``pytest.skip``, ``skipif``, ``importorskip``, a module-level skip) becomes a failure that keeps
the skip's reason, so the run fails and its summary names each test and what it was missing.

A skip that is right on every machine (none today) says so with ``@pytest.mark.skip_ok("why")`` on the test: it
stays a skip, with the reason, also in CI.

Loaded by ``tests/conftest.py`` (``pytest_plugins``); ``-p tests.strict_skips`` loads it into any other run.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

STRICT_ENV = "UNET_TESTS_STRICT"
SKIP_OK = "skip_ok"


def strict() -> bool:
    """Whether skips fail the run: ``UNET_TESTS_STRICT`` is set to anything but empty, ``0``, ``false`` or ``no``."""
    return os.environ.get(STRICT_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _message(reason: str) -> str:
    # The reason first: the run's short summary cuts each line at the terminal's width.
    return (f"{reason} [a skip, failed because {STRICT_ENV} is set (CI): provide what is missing; a skip right "
            f"on every machine is marked @pytest.mark.{SKIP_OK}(reason)]")


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker of a skip that stays a skip in CI.

    Args:
        config: the pytest config.
    """
    config.addinivalue_line("markers", f"{SKIP_OK}(reason): this test's skips are right on every machine; "
                                       f"they stay skips also where {STRICT_ENV} is set")


def _strict_phase(item: pytest.Item) -> Generator[None, object, object]:
    """Run one phase of a test (the hooks inside it), turning a skip into a failure in strict mode."""
    try:
        return (yield)
    except pytest.skip.Exception as skip:
        if not strict() or item.get_closest_marker(SKIP_OK) is not None:
            raise
        raise pytest.fail.Exception(_message(skip.msg or "no reason given"), pytrace=False) from None


# A wrapper around every implementation of the phase: skip marks (the skipping plugin's setup), a fixture's
# pytest.skip (setup, also each later test of a module-scoped fixture that skipped) and the test body's (call).
@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    """Set up a test; in strict mode a skip fails it.

    Args:
        item: the test.
    """
    return (yield from _strict_phase(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """Run a test; in strict mode a skip fails it.

    Args:
        item: the test.
    """
    return (yield from _strict_phase(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    """Tear down a test; in strict mode a skip fails it.

    Args:
        item: the test.
        nextitem: the next test, if any.
    """
    return (yield from _strict_phase(item))


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """Collect a module; in strict mode a module-level skip (``allow_module_level``, ``importorskip``) is an error.

    Args:
        collector: the module or package being collected.
    """
    report = yield
    if report.skipped and strict():
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        report.outcome = "failed"
        report.longrepr = _message(str(reason).removeprefix("Skipped: "))
    return report
