"""Skips fail the run under ``UNET_TESTS_STRICT`` (CI) and stay skips with their reasons without it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from tests.strict_skips import STRICT_ENV

# Each way a test of this project skips: a module fixture (Orthanc, PostgreSQL), the body (data), a skipif mark,
# and one marked as right everywhere.
SKIPPING = '''
import pytest

@pytest.fixture(scope="module")
def server():
    pytest.skip("/usr/sbin/Orthanc not found: install the Debian package orthanc")

def test_first_pacs(server): pass
def test_second_pacs(server): pass
def test_needs_data(): pytest.skip("real hippocampus data not found at /nowhere")
@pytest.mark.skipif(True, reason="no C++ compiler")
def test_compiled(): pass
@pytest.mark.skip_ok("the same on every machine")
def test_allowed(): pytest.skip("right everywhere")
def test_passes(): pass
'''
MODULE_SKIP = 'import pytest\npytest.importorskip("no_such_module_here")\ndef test_never(): pass\n'


def _pytest(folder: Path, strict: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in (STRICT_ENV, "PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER")}
    if strict is not None:
        env[STRICT_ENV] = strict
    # The plugin from this checkout, none of the project's conftest or settings; a module that skips as a whole is
    # a collection error in strict mode, which would stop the run before the others.
    env["COLUMNS"] = "300"  # the summary lines whole
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.strict_skips", "-p", "no:cacheprovider",
                           "-ra", "-q", "--continue-on-collection-errors", "."],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=120)


def test_skips_fail_naming_test_and_reason_under_the_strict_variable_and_skip_without(tmp_path: Path) -> None:
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)

    strict = _pytest(tmp_path, "1")
    assert strict.returncode == 1, strict.stdout
    lines = strict.stdout.splitlines()
    for test, reason in (("test_first_pacs", "/usr/sbin/Orthanc not found"), ("test_second_pacs", "/usr/sbin/Orthanc"),
                         ("test_needs_data", "real hippocampus data not found"), ("test_compiled", "no C++ compiler")):
        assert any(f"::{test} - Failed: {reason}" in line for line in lines if line.startswith(("FAILED", "ERROR"))), \
            (test, strict.stdout)
    assert "ERROR test_module_skip.py" in strict.stdout and "no_such_module_here" in strict.stdout
    assert "SKIPPED [1] test_skipping.py" in strict.stdout and "right everywhere" in strict.stdout  # skip_ok stays
    assert "1 passed, 1 skipped" in strict.stdout

    for relaxed in (None, "0"):
        run = _pytest(tmp_path, relaxed)
        assert run.returncode == 0, run.stdout
        assert "1 passed, 6 skipped" in run.stdout and "/usr/sbin/Orthanc not found" in run.stdout
        assert "FAILED" not in run.stdout and "ERROR" not in run.stdout
