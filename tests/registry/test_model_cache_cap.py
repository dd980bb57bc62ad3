"""The model cache's size cap and ``unet-pipeline cache``: least recently used copies go first, never the one in
use, and the cap comes from the environment over the config.

The cache is driven directly with real files (each "model" a 100 kB checkpoint written by the download
callback), so no registry is needed; tests/registry/test_model_cache.py covers the downloads from a real server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.registry import model_cache
from tests.conftest import run_main

MODEL_BYTES = 100_000
# Two models (each 100 kB plus a small manifest) fit, three do not.
CAP_GB = 250_000 / model_cache.GB


def _models() -> Path:
    folder = model_cache.usable_models_dir()
    assert folder is not None
    return folder


def _use(name: str, downloads: list[str], cap_gb: float | None = CAP_GB) -> Path:
    """Fetch model ``name`` version 1 through the cache, as resolve_model does, and release it as a loaded model is
    (load_predictor); ``downloads`` records each download."""
    checkpoint = _fetch(name, downloads, cap_gb)
    model_cache.release(checkpoint)
    return checkpoint


def _fetch(name: str, downloads: list[str], cap_gb: float | None = CAP_GB) -> Path:
    """As :func:`_use`, but the copy stays held (a model still being loaded)."""

    def download(dst: Path) -> Path:
        downloads.append(name)
        dst.mkdir(parents=True)
        checkpoint = dst / "checkpoint.pt"
        checkpoint.write_bytes(name.encode() * (MODEL_BYTES // len(name)))
        return checkpoint

    key = model_cache.cache_key("http://registry", name, "1", f"run-{name}", 1)
    return model_cache.cached_checkpoint(_models(), key, f"{name} version 1", download, (name, "1"), cap_gb)


def _cached() -> list[str]:
    return sorted(e.name for e in model_cache.entries(_models()))


def test_the_copy_used_longest_ago_is_evicted_not_the_oldest_download() -> None:
    downloads: list[str] = []
    _use("alpha", downloads)
    _use("beta", downloads)
    _use("alpha", downloads)  # alpha was downloaded first but is now the one used last
    assert downloads == ["alpha", "beta"]
    _use("gamma", downloads)
    assert _cached() == ["alpha", "gamma"]
    assert sum(e.size_bytes for e in model_cache.entries(_models())) <= CAP_GB * model_cache.GB
    _use("alpha", downloads)
    assert downloads == ["alpha", "beta", "gamma"]  # still cached: no download
    assert not [p for p in _models().iterdir() if p.name.startswith(".")]  # nothing half-deleted left behind


def test_a_cap_smaller_than_one_model_keeps_just_the_one_in_use() -> None:
    downloads: list[str] = []
    first = _use("alpha", downloads, cap_gb=0.0)
    assert _cached() == ["alpha"] and first.read_bytes().startswith(b"alpha")
    second = _use("beta", downloads, cap_gb=0.0)
    assert _cached() == ["beta"] and second.is_file() and not first.exists()
    _use("beta", downloads, cap_gb=0.0)
    assert downloads == ["alpha", "beta"]


def test_no_cap_keeps_everything() -> None:
    downloads: list[str] = []
    for name in ("alpha", "beta", "gamma"):
        _use(name, downloads, cap_gb=None)
    assert _cached() == ["alpha", "beta", "gamma"]


def test_the_environment_overrides_the_configured_cap(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    downloads: list[str] = []
    monkeypatch.setenv(model_cache.MAX_GB_ENV, "1")
    for name in ("alpha", "beta", "gamma"):
        _use(name, downloads, cap_gb=0.0)  # the config says 0: the environment's 1 GB wins
    assert _cached() == ["alpha", "beta", "gamma"]
    monkeypatch.setenv(model_cache.MAX_GB_ENV, str(CAP_GB))
    _use("delta", downloads, cap_gb=None)  # the config says no cap: the environment's wins
    assert _cached() == ["delta", "gamma"]
    assert model_cache.max_gb(5.0) == (CAP_GB, model_cache.MAX_GB_ENV)
    monkeypatch.setenv(model_cache.MAX_GB_ENV, "none")
    assert model_cache.max_gb(5.0) == (None, model_cache.MAX_GB_ENV)
    monkeypatch.setenv(model_cache.MAX_GB_ENV, "-1")
    with pytest.raises(ConfigError, match="UNET_PIPELINE_CACHE_MAX_GB: '-1' is not a size in GB"):
        model_cache.max_gb(5.0)
    monkeypatch.delenv(model_cache.MAX_GB_ENV)
    assert model_cache.max_gb(5.0) == (5.0, "registry.model_cache_max_gb")
    assert model_cache.max_gb() == (load_config().registry.model_cache_max_gb, "registry.model_cache_max_gb")
    with pytest.raises(ConfigError, match="'registry.model_cache_max_gb' must be >= 0"):
        load_config(None, ["registry.model_cache_max_gb=-2"])


def test_cache_list_and_clear(tmp_path: Path) -> None:
    downloads: list[str] = []
    for name in ("alpha", "beta", "gamma"):
        _use(name, downloads, cap_gb=None)
    config = tmp_path / "c.yaml"
    config.write_text("data: {synthetic_cases: 4}\nregistry: {model_cache_max_gb: 7.5}\n")
    listed = run_main("cache", "list", "--config", str(config))
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert [line.split()[:2] for line in lines[1:4]] == [["alpha", "1"], ["beta", "1"], ["gamma", "1"]]
    assert lines[-1].startswith("3 cached model version(s)")
    assert lines[-1].endswith(f"cap: 7.5 GB (registry.model_cache_max_gb in {config})")
    cleared = run_main("cache", "clear", "--model", "beta")
    assert cleared.returncode == 0 and cleared.stdout.startswith("Deleted 1 cached model version(s) of beta")
    assert _cached() == ["alpha", "gamma"]
    assert run_main("cache", "clear", "--model", "alpha", "--version", "2").stdout.startswith("Deleted 0 ")
    assert run_main("cache", "clear").stdout.startswith("Deleted 2 cached model version(s)")
    assert _cached() == [] and os.listdir(_models()) == []
    bad = run_main("cache", "clear", "--version", "1")
    assert bad.returncode != 0 and bad.stderr.strip() == "error: cache clear: --version needs --model"


# A second process fetches alpha through the cache and keeps it held (loading) until told to release it.
_LOADER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from pipeline.registry import model_cache

    def download(dst: Path) -> Path:
        raise AssertionError("alpha is cached: the loader must not download it")

    key = model_cache.cache_key("http://registry", "alpha", "1", "run-alpha", 1)
    checkpoint = model_cache.cached_checkpoint(model_cache.usable_models_dir(), key, "alpha version 1", download,
                                               ("alpha", "1"), None)
    print("holding", flush=True)
    sys.stdin.readline()
    model_cache.release(checkpoint)
    print("released", flush=True)
    sys.stdin.readline()
""")


def test_a_copy_another_process_is_loading_is_not_evicted_until_it_is_done() -> None:
    downloads: list[str] = []
    _use("alpha", downloads, cap_gb=None)
    loader = subprocess.Popen([sys.executable, "-c", _LOADER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert loader.stdout is not None and loader.stdin is not None
        assert loader.stdout.readline().strip() == "holding"
        # This process goes over the cap: alpha is the copy used longest ago, but the other process holds it.
        _use("beta", downloads, cap_gb=0.0)
        assert _cached() == ["alpha", "beta"]
        assert model_cache.clear(_models(), "alpha") == []  # `cache clear` leaves it too
        alpha = [e for e in model_cache.entries(_models()) if e.name == "alpha"][0]
        assert (_models() / alpha.key / "model" / "checkpoint.pt").read_bytes().startswith(b"alpha")
        loader.stdin.write("\n")
        loader.stdin.flush()
        assert loader.stdout.readline().strip() == "released"
        # Released (the process still runs): the next eviction deletes it.
        _use("beta", downloads, cap_gb=0.0)
        assert _cached() == ["beta"]
        assert downloads == ["alpha", "beta"]
        loader.stdin.write("\n")
        loader.stdin.flush()
        assert loader.wait(timeout=60) == 0
    finally:
        loader.kill()
        loader.wait()


def test_this_process_holds_a_copy_until_it_releases_it() -> None:
    downloads: list[str] = []
    held = _fetch("alpha", downloads, cap_gb=None)
    _use("beta", downloads, cap_gb=0.0)
    assert _cached() == ["alpha", "beta"] and held.is_file()
    model_cache.release(held)
    _use("beta", downloads, cap_gb=0.0)
    assert _cached() == ["beta"] and not held.exists()
