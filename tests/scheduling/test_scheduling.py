"""The work-directory lock (against real other processes) and the run-state files."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import EXIT_LOCKED, InputDataError, LockHeldError
from pipeline.scheduling.lock import work_dir_lock
from pipeline.scheduling.state import RunState, code_version, config_hash, load_state, save_state, state_path

REPO = Path(__file__).resolve().parents[2]

HOLDER = """
import sys, time
from pathlib import Path
from pipeline.scheduling import work_dir_lock
with work_dir_lock(Path(sys.argv[1]), "run"):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path: Path):
    """Start another Python process that takes the lock and sleeps; yields it once it holds the lock."""
    work = tmp_path / "work"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(work)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield work, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()


def test_lock_held_by_another_process_raises_with_its_pid(holder) -> None:
    work, proc = holder
    with pytest.raises(LockHeldError) as info:
        with work_dir_lock(work, "run"):
            pytest.fail("the body must not run while another process holds the lock")
    message = str(info.value)
    assert f"pid {proc.pid}" in message
    assert socket.gethostname() in message
    assert "exits without doing anything" in message
    assert "\n" not in message
    assert info.value.exit_code == EXIT_LOCKED == 3


def test_lock_file_is_json_while_held(holder) -> None:
    work, proc = holder
    record = json.loads((work / ".lock").read_text())
    assert record["pid"] == proc.pid
    assert record["host"] == socket.gethostname()
    assert record["command"] == "run"
    assert record["started"].endswith("+00:00")  # ISO 8601, UTC


def test_lock_of_a_killed_process_is_taken_over(holder) -> None:
    work, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    # The dead holder's record is still in the file: it must not block us.
    assert json.loads((work / ".lock").read_text())["pid"] == proc.pid
    with work_dir_lock(work, "train"):
        record = json.loads((work / ".lock").read_text())
        assert record["pid"] == os.getpid()
        assert record["command"] == "train"


def test_lock_is_exclusive_within_one_process_and_released_after(tmp_path: Path) -> None:
    with work_dir_lock(tmp_path, "run") as path:
        assert path == tmp_path / ".lock"
        with pytest.raises(LockHeldError, match=f"pid {os.getpid()}"):
            with work_dir_lock(tmp_path, "run"):
                pass
    assert (tmp_path / ".lock").read_text() == ""  # no stale record after a clean exit
    with work_dir_lock(tmp_path, "run"):
        pass


def test_lock_released_when_the_body_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with work_dir_lock(tmp_path, "run"):
            raise RuntimeError("boom")
    with work_dir_lock(tmp_path, "run"):
        pass


def test_lock_blocks_another_process_which_exits_3(tmp_path: Path) -> None:
    """The reverse direction: we hold it, a real second process is refused."""
    probe = ("import sys; from pathlib import Path; from pipeline.scheduling import work_dir_lock\n"
             "from pipeline.errors import LockHeldError\n"
             "try:\n    with work_dir_lock(Path(sys.argv[1]), 'run'): sys.exit(0)\n"
             "except LockHeldError as e:\n    print(e); sys.exit(e.exit_code)")
    with work_dir_lock(tmp_path, "run"):
        done = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                              timeout=60)
    assert done.returncode == 3, done.stderr
    assert f"pid {os.getpid()}" in done.stdout
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def _state(**overrides) -> RunState:
    values = {"status": "running", "run_id": "abc123", "data_hash": "d" * 64, "config_hash": "c" * 64,
              "code_version": {"package": "0.1.0", "git_commit": None, "git_dirty": None}, "fold": 2}
    return RunState(**{**values, **overrides})


def test_state_round_trip_and_no_temporary_left(tmp_path: Path) -> None:
    assert load_state(tmp_path, 2) is None
    state = _state()
    path = save_state(tmp_path, state)
    assert path == tmp_path / "state" / "fold_2.json" == state_path(tmp_path, 2)
    assert load_state(tmp_path, 2) == state
    done = _state(status="completed", finished="2025-01-01T02:03:04+00:00")
    save_state(tmp_path, done)
    assert load_state(tmp_path, 2) == done
    assert load_state(tmp_path, 0) is None  # folds are separate files
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["fold_2.json"]


def test_state_write_is_atomic_under_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between writing and renaming leaves the previous state intact and no temporary file."""
    save_state(tmp_path, _state())

    def crash(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        save_state(tmp_path, _state(status="completed"))
    monkeypatch.undo()
    assert load_state(tmp_path, 2).status == "running"
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["fold_2.json"]


def test_state_rejects_bad_status_and_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="status"):
        _state(status="done")
    path = state_path(tmp_path, 1)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(InputDataError, match="fold_1.json"):
        load_state(tmp_path, 1)
    path.write_text(json.dumps({"status": "finished", "run_id": None, "data_hash": "", "config_hash": ""}))
    with pytest.raises(InputDataError, match="delete it"):
        load_state(tmp_path, 1)


def test_state_ignores_keys_from_a_newer_version(tmp_path: Path) -> None:
    path = state_path(tmp_path, 0)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"status": "trained", "run_id": "r", "data_hash": "d", "config_hash": "c",
                                "fold": 0, "future_key": 1}))
    assert load_state(tmp_path, 0).status == "trained"


def test_config_hash_is_canonical() -> None:
    a = {"train": {"epochs": 10, "lr": 0.01}, "data": {"fold": 0}}
    b = {"data": {"fold": 0}, "train": {"lr": 0.01, "epochs": 10}}
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 64
    assert config_hash(a) != config_hash({**a, "data": {"fold": 1}})
    assert config_hash({"p": Path("/x")}) == config_hash({"p": "/x"})


def test_code_version_reports_package_and_git(monkeypatch: pytest.MonkeyPatch) -> None:
    version = code_version()
    assert version["package"] == "0.1.0"
    if (REPO / ".git").exists():
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        assert version["git_commit"] == head
        assert isinstance(version["git_dirty"], bool)
        # Local changes count by content, not by a flag: the diff's hash is there exactly when dirty.
        assert (version["git_diff_sha256"] is not None) == version["git_dirty"]
    # Without git on the PATH: no commit, and no exception.
    monkeypatch.setenv("PATH", "/nonexistent")
    assert code_version() == {"package": "0.1.0", "git_commit": None, "git_dirty": None, "git_diff_sha256": None}


def test_lock_refused_at_once_while_the_record_is_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty lock file (a holder between locking and writing) still gives a readable message."""
    import fcntl

    (tmp_path / ".lock").touch()
    fd = os.open(tmp_path / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        tries: list[int] = []
        real_flock = fcntl.flock

        def recording(fd: int, operation: int) -> None:
            tries.append(operation)
            real_flock(fd, operation)

        monkeypatch.setattr(fcntl, "flock", recording)
        with pytest.raises(LockHeldError, match="not written yet"):
            with work_dir_lock(tmp_path, "run"):
                pass
        # Refused at once: one non-blocking try, no waiting for the holder and no polling.
        assert tries == [fcntl.LOCK_EX | fcntl.LOCK_NB]
    finally:
        os.close(fd)
