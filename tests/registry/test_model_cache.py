"""The model cache against a real ``mlflow server``: a registered version is downloaded once, a moved alias is
followed at once, a damaged copy is replaced, and ``predict`` reuses the copy."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest

from pipeline import registry
from pipeline.registry import model_cache, registration
from tests.conftest import run_main, save_untrained_2mm_model
from tests.mlflow_server import MlflowServer, mlflow_server  # noqa: F401

pytestmark = pytest.mark.slow


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checkpoint(path: Path, bias: float = 0.0) -> Path:
    """The untrained 2 mm model; another ``bias`` on label 1 gives other weights (another sha256)."""
    from pipeline.inference.checkpoints import load_checkpoint, save_checkpoint

    save_untrained_2mm_model(path)
    if bias:
        ckpt = load_checkpoint(path)
        ckpt["state_dict"]["head.bias"][1] += bias
        save_checkpoint({k: v for k, v in ckpt.items() if k != "format"}, path)
    return path


def _register(uri: str, work: Path, checkpoint: Path, name: str, champion: bool = True) -> str:
    """Register ``checkpoint`` as the next version of ``name`` (in a run, as training does); optionally champion."""
    registry.setup(uri, work, "model-cache")
    with mlflow.start_run():
        version = registry.log_model(checkpoint, name)
    if champion:
        mlflow.MlflowClient().set_registered_model_alias(name, "champion", version)
    return version


@pytest.fixture
def downloads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The artifact URIs ``resolve_model`` downloads from (the real download still happens)."""
    calls: list[str] = []
    real = mlflow.artifacts.download_artifacts

    def spy(*args, **kwargs):
        calls.append(kwargs.get("artifact_uri") or args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", spy)
    return calls


@pytest.fixture
def server(mlflow_server: MlflowServer) -> MlflowServer:  # noqa: F811
    """The module's server, started again if an earlier test stopped it."""
    mlflow_server.start()
    return mlflow_server


def _cache_models() -> Path:
    return Path(os.environ["UNET_PIPELINE_CACHE"]) / "models"


def test_a_version_is_downloaded_once_and_reused(server: MlflowServer, tmp_path: Path, downloads: list[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = _checkpoint(tmp_path / "v1.pt")
    _register(server.uri, tmp_path / "work", checkpoint, "cache-once")
    downloads.clear()
    lookups = []
    for method in ("get_model_version", "get_model_version_by_alias"):
        real = getattr(mlflow.MlflowClient, method)
        monkeypatch.setattr(mlflow.MlflowClient, method,
                            lambda self, *a, _real=real, _name=method, **k: lookups.append(_name) or _real(self, *a, **k))
    first = registry.resolve_model("models:/cache-once@champion", tmp_path / "work", tmp_path / "dl1", server.uri)
    second = registry.resolve_model("models:/cache-once@champion", tmp_path / "work", tmp_path / "dl2", server.uri)
    assert downloads == ["models:/cache-once/1"]
    assert lookups == ["get_model_version_by_alias"] * 2  # the alias is followed on every call, one request each
    assert (first.name, first.version) == (second.name, second.version) == ("cache-once", "1")
    assert second.path == first.path and _cache_models() in first.path.parents
    assert _sha256(second.path) == _sha256(checkpoint)
    assert not (tmp_path / "dl1").exists() and not (tmp_path / "dl2").exists()
    # One whole copy, no download folder left behind.
    assert [p.name for p in _cache_models().iterdir()] == [first.path.relative_to(_cache_models()).parts[0]]
    # It records what it is, for `unet-pipeline cache list`.
    assert [(e.name, e.version) for e in model_cache.entries(_cache_models())] == [("cache-once", "1")]


def test_a_new_champion_is_used_at_once(server: MlflowServer, tmp_path: Path, downloads: list[str]) -> None:
    work, ref = tmp_path / "work", "models:/cache-alias@champion"
    v1 = _checkpoint(tmp_path / "v1.pt")
    _register(server.uri, work, v1, "cache-alias")
    assert _sha256(registry.resolve_model(ref, work, tmp_path / "dl", server.uri).path) == _sha256(v1)
    v2 = _checkpoint(tmp_path / "v2.pt", bias=0.5)
    assert _sha256(v2) != _sha256(v1)
    assert _register(server.uri, work, v2, "cache-alias") == "2"
    downloads.clear()
    resolved = registry.resolve_model(ref, work, tmp_path / "dl", server.uri)
    assert resolved.version == "2" and _sha256(resolved.path) == _sha256(v2)
    assert downloads == ["models:/cache-alias/2"]
    # Both versions stay cached.
    again = registry.resolve_model("models:/cache-alias/1", work, tmp_path / "dl", server.uri)
    assert _sha256(again.path) == _sha256(v1)
    assert _sha256(registry.resolve_model(ref, work, tmp_path / "dl", server.uri).path) == _sha256(v2)
    assert downloads == ["models:/cache-alias/2"]


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))  # same size: only the sha256 tells


@pytest.mark.parametrize("damage", ["checkpoint bytes", "a file removed"])
def test_a_damaged_copy_is_downloaded_again_with_one_warning(server: MlflowServer, tmp_path: Path, damage: str,
                                                             downloads: list[str],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    name = "cache-damage-" + damage.split()[-1]
    checkpoint = _checkpoint(tmp_path / "v1.pt")
    _register(server.uri, tmp_path / "work", checkpoint, name)
    downloads.clear()
    ref = f"models:/{name}@champion"
    cached = registry.resolve_model(ref, tmp_path / "work", tmp_path / "dl", server.uri).path
    if damage == "checkpoint bytes":
        _flip_bytes(cached)
        assert _sha256(cached) != _sha256(checkpoint)
    else:
        (cached.parents[1] / "MLmodel").unlink()
    with caplog.at_level(logging.INFO, logger="pipeline.registry.model_cache"):
        resolved = registry.resolve_model(ref, tmp_path / "work", tmp_path / "dl", server.uri)
    assert downloads == [f"models:/{name}/1"] * 2
    assert _sha256(resolved.path) == _sha256(checkpoint)
    assert (resolved.path.parents[1] / "MLmodel").is_file()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].exc_info is None
    assert f"{name} version 1" in warnings[0].getMessage() and "failed its check" in warnings[0].getMessage()
    assert len(list(_cache_models().iterdir())) == 1  # the bad copy is gone
    # The fresh copy passes its check: the next call downloads nothing.
    registry.resolve_model(ref, tmp_path / "work", tmp_path / "dl", server.uri)
    assert len(downloads) == 2


def test_predict_twice_downloads_once(server: MlflowServer, tmp_path: Path, hippocampus: Path, downloads: list[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    image = sorted((hippocampus / "imagesTr").glob("*.nii.gz"))[0]
    work = tmp_path / "work"
    _register(server.uri, work, _checkpoint(tmp_path / "model.pt"), "cache-predict")
    # Registering in this process set the URI itself; predict must follow the user's variable as a CLI call does.
    monkeypatch.setattr(registration, "_uri_we_set", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    downloads.clear()
    masks = []
    for out in (tmp_path / "first", tmp_path / "second"):
        done = run_main("predict", "--model", "models:/cache-predict@champion", str(image), "--out", str(out),
                        "--no-seg", "--work-dir", str(work), "--device", "cpu")
        assert done.returncode == 0, done.stderr
        masks.append(np.asarray(nib.load(out / image.name).dataobj))
    assert downloads == ["models:/cache-predict/1"]
    assert masks[0].any(), "an empty mask would make the comparison trivial"
    np.testing.assert_array_equal(masks[0], masks[1])


def _writes(content: bytes):
    """A download that writes one checkpoint holding ``content``."""
    def download(dst: Path) -> Path:
        dst.mkdir(parents=True)
        (dst / "checkpoint.pt").write_bytes(content)
        return dst / "checkpoint.pt"
    return download


def test_losing_the_rename_race_uses_the_winners_copy() -> None:
    from pipeline.registry import model_cache

    models = model_cache.usable_models_dir()

    def slow_download(dst: Path) -> Path:
        # Another process finishes the same version while this download is still running.
        model_cache.cached_checkpoint(models, "key", "m version 1", _writes(b"winner"))
        return _writes(b"loser")(dst)

    path = model_cache.cached_checkpoint(models, "key", "m version 1", slow_download)
    assert path.read_bytes() == b"winner"
    assert [p.name for p in models.iterdir()] == ["key"]  # the losing download is removed


def test_a_failed_download_leaves_nothing_behind() -> None:
    from pipeline.registry import model_cache

    models = model_cache.usable_models_dir()

    def failing(dst: Path) -> Path:
        _writes(b"half")(dst)
        raise OSError("connection reset")

    with pytest.raises(OSError):
        model_cache.cached_checkpoint(models, "key", "m version 1", failing)
    assert list(models.iterdir()) == []


def test_an_unwritable_cache_falls_back_to_the_download_dir(server: MlflowServer, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("UNET_PIPELINE_CACHE", str(blocker / "cache"))  # cannot be created under a file
    checkpoint = _checkpoint(tmp_path / "v1.pt")
    _register(server.uri, tmp_path / "work", checkpoint, "cache-readonly")
    with caplog.at_level(logging.WARNING, logger="pipeline.registry.model_cache"):
        resolved = registry.resolve_model("models:/cache-readonly@champion", tmp_path / "work", tmp_path / "dl",
                                          server.uri)
    assert tmp_path / "dl" in resolved.path.parents and _sha256(resolved.path) == _sha256(checkpoint)
    assert any("without caching" in r.getMessage() for r in caplog.records)


def test_the_configured_cap_evicts_the_version_used_longest_ago(server: MlflowServer, tmp_path: Path,
                                                                downloads: list[str]) -> None:
    work = tmp_path / "work"
    _register(server.uri, work, _checkpoint(tmp_path / "a.pt"), "cache-cap-a")
    _register(server.uri, work, _checkpoint(tmp_path / "b.pt", bias=0.5), "cache-cap-b")
    downloads.clear()
    a = registry.resolve_model("models:/cache-cap-a/1", work, tmp_path / "dl", server.uri)
    assert [e.name for e in model_cache.entries(_cache_models())] == ["cache-cap-a"]
    model_cache.release(a.path)  # loaded, as load_predictor releases it
    # registry.model_cache_max_gb: 0 keeps only the version in use.
    b = registry.resolve_model("models:/cache-cap-b/1", work, tmp_path / "dl", server.uri, cache_max_gb=0.0)
    assert [e.name for e in model_cache.entries(_cache_models())] == ["cache-cap-b"]
    assert b.path.is_file() and not a.path.exists()
    assert downloads == ["models:/cache-cap-a/1", "models:/cache-cap-b/1"]


def test_predict_evaluate_and_pacs_take_the_caches_caps_from_their_config(server: MlflowServer, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import cli
    from pipeline.config import RegistryConfig

    config = tmp_path / "small-caches.yaml"
    config.write_text("data: {synthetic_cases: 4}\nregistry: {model_cache_max_gb: 0, compiled_cache_max_gb: 0.25}\n")
    parser = cli.build_parser()
    for command in (["evaluate", "--data", "d"], ["predict", "in.nii.gz", "--out", "o"], ["pacs", "predict", "--study", "1"],
                    ["pacs", "watch"]):
        overrides = cli._overrides(parser.parse_args([*command, "--model", "m", "--config", str(config)]))
        assert (overrides.model_cache_max_gb, overrides.compiled_cache_max_gb) == (0.0, 0.25), command
        assert overrides.engine()["compiled_cache_max_gb"] == 0.25  # what the engine builds packages with
    default = cli._overrides(parser.parse_args(["predict", "in.nii.gz", "--out", "o", "--model", "m"]))
    assert (default.model_cache_max_gb, default.compiled_cache_max_gb) == (
        RegistryConfig.model_cache_max_gb, RegistryConfig.compiled_cache_max_gb)

    # What those commands load their model(s) with: the cap of --config, here 0 (only the version in use stays).
    work = tmp_path / "work"
    _register(server.uri, work, _checkpoint(tmp_path / "a.pt"), "cache-config-a")
    _register(server.uri, work, _checkpoint(tmp_path / "b.pt", bias=0.5), "cache-config-b")
    monkeypatch.setattr(registration, "_uri_we_set", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    registry.load_predictor(["models:/cache-config-a/1"], work, default, "cpu")
    assert [e.name for e in model_cache.entries(_cache_models())] == ["cache-config-a"]
    registry.load_predictor(["models:/cache-config-b/1"], work, overrides, "cpu")
    assert [e.name for e in model_cache.entries(_cache_models())] == ["cache-config-b"]
    # Loaded and released: a later eviction takes it too (nothing of this process holds it).
    assert model_cache.evict(_cache_models(), 0.0) and model_cache.entries(_cache_models()) == []
