"""Bad input ends with one clear line naming the problem, a non-zero exit code and nothing partial."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from tests.conftest import run_main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The real console entry point in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=300)


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, res.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def _after_start_up(err: str) -> str:
    """Stderr after the start-up line that says the job's threads (pipeline/cpus.py), which comes first."""
    first, _, rest = err.partition("\n")
    assert first.startswith("threads: "), err
    return rest


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert_one_line_error(run_cli("run", str(missing), "--work-dir", str(tmp_path / "w")), str(missing), "not found")
    assert not (tmp_path / "w").exists()


def test_unknown_config_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"train": {"epoch": 2}}))
    assert_one_line_error(run_main("train", str(cfg), "--work-dir", str(tmp_path / "w")), "train.epoch", str(cfg))


def test_bad_set_value(tmp_path: Path) -> None:
    res = run_main("run", "--set", "train.epochs=-3", "--work-dir", str(tmp_path / "w"))
    assert_one_line_error(res, "train.epochs", ">= 1")


def test_predict_missing_input_writes_nothing(tmp_path: Path, tiny_checkpoint: Path) -> None:
    out = tmp_path / "out"
    missing = tmp_path / "absent.nii.gz"
    res = run_main("predict", "--model", str(tiny_checkpoint), str(missing), "--out", str(out))
    assert_one_line_error(res, str(missing), "not found")
    assert not out.exists() or not any(out.iterdir())


def test_predict_unreadable_nifti_writes_nothing(tmp_path: Path, tiny_checkpoint: Path) -> None:
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00garbage")
    out = tmp_path / "out"
    res = run_cli("predict", "--model", str(tiny_checkpoint), str(broken), "--out", str(out))
    assert_one_line_error(res, str(broken))
    assert not out.exists() or not any(out.iterdir())


def test_unknown_registered_model(tmp_path: Path, hippocampus: Path) -> None:
    res = run_main("evaluate", "--model", "models:/nobody@champion", "--data", str(hippocampus),
                  "--work-dir", str(tmp_path / "w"))
    assert_one_line_error(res, "models:/nobody@champion", "not found")
    assert not (tmp_path / "w" / "evaluation").exists()


def test_missing_dataset(tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["evaluate", "--model", str(tiny_checkpoint), "--data", str(tmp_path / "none"), "--out", str(tmp_path / "e")])
    assert code == 2
    err = _after_start_up(capsys.readouterr().err)
    assert err.startswith("error: ") and str(tmp_path / "none") in err and "dataset not found" in err


def test_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pipeline.data.demo import make_demo_dataset

    data = make_demo_dataset(tmp_path / "d", 2, [32, 32, 32])
    code = main(["evaluate", "--model", str(tmp_path / "x.pt"), "--data", str(data), "--out", str(tmp_path / "e")])
    assert code == 2
    err = _after_start_up(capsys.readouterr().err)
    assert err.startswith("error: ") and "x.pt" in err and "model checkpoint not found" in err
    assert not (tmp_path / "e").exists()


def test_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fake = tmp_path / "fake.pt"
    fake.write_bytes(b"not a torch file")
    code = main(["predict", "--model", str(fake), str(fake), "--out", str(tmp_path / "o")])
    assert code == 2 and "not a readable checkpoint" in capsys.readouterr().err


def test_dataset_escaping_its_folder(tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "dataset.json").write_text(
        '{"labels": {"0": "bg", "1": "x"}, "training": [{"image": "../../etc/passwd", "label": "./l.nii.gz"}]}'
    )
    code = main(["evaluate", "--model", str(tiny_checkpoint), "--data", str(ds), "--out", str(tmp_path / "e")])
    assert code == 2 and "escapes the dataset folder" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_evaluate_cases_naming_a_case_the_dataset_lacks(tmp_path: Path, tiny_checkpoint: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    from pipeline.data.demo import make_demo_dataset

    data = make_demo_dataset(tmp_path / "d", 2, [32, 32, 32])
    listed = tmp_path / "held.txt"
    listed.write_text("hippocampus_001\n")
    code = main(["evaluate", "--model", str(tiny_checkpoint), "--data", str(data), "--cases", str(listed),
                 "--out", str(tmp_path / "e")])
    assert code == 2
    err = _after_start_up(capsys.readouterr().err)
    assert err.startswith("error: ") and str(listed) in err and "hippocampus_001" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "e").exists()
