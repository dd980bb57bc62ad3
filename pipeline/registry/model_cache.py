"""A per-user cache of registered model versions: each one is downloaded once and reused.

A registered version is immutable, so its copy stays good for as long as it passes its
check. The layout under the cache root (``UNET_PIPELINE_CACHE``, else
``$XDG_CACHE_HOME/unet-pipeline``, else ``~/.cache/unet-pipeline``)::

    models/<key>/manifest.json   file names and sizes, the checkpoint and its sha256
    models/<key>/model/...       the model's artifacts as MLflow downloaded them
    models/.download-*/          a download in progress (renamed to <key> when complete)
    models/.discard-*/           a copy that failed its check, being deleted

The key hashes the registry URI (without credentials), the model name and version, and the
version's run id and creation time: a reinstalled server that hands out the same name and
version number again gets a new key instead of the old copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from pipeline.data import cache_root, file_sha256, write_text_atomic
from pipeline.errors import PipelineError
from pipeline.registry.server import redact_uri

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MODEL_DIR = "model"


def usable_models_dir() -> Path | None:
    """The cache's ``models`` folder, created; ``None`` (with a warning) when it cannot be written.

    A read-only home (a container) must not stop a prediction: the caller then downloads
    as before, without caching.
    """
    folder = cache_root() / "models"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        logger.warning("model cache %s cannot be created (%s); downloading without caching",
                       folder, exc.__class__.__name__)
        return None
    if not os.access(folder, os.W_OK | os.X_OK):
        logger.warning("model cache %s is not writable; downloading without caching", folder)
        return None
    return folder


def cache_key(registry_uri: str, name: str, version: str, run_id: str | None, created_ms: int | None) -> str:
    """The folder name of one registered version's copy.

    Args:
        registry_uri: the model registry's URI; credentials are removed before hashing (and a
            changed password keeps the copies).
        name: registered model name.
        version: the version number.
        run_id: the run the version was registered from.
        created_ms: the version's creation timestamp.
    """
    identity = json.dumps([redact_uri(registry_uri), name, str(version), run_id, created_ms])
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def cached_checkpoint(models_dir: Path, key: str, label: str, download: Callable[[Path], Path]) -> Path:
    """The checkpoint of a cached copy that passes its check, downloading the copy first when needed.

    Args:
        models_dir: the cache's ``models`` folder (:func:`usable_models_dir`).
        key: the version's :func:`cache_key`.
        label: the model in words for the log (name and version; never a patient's data).
        download: downloads the model into the folder it is given and returns its checkpoint there.

    Returns:
        The checkpoint inside the cache: read it, never change or delete it.
    """
    folder = models_dir / key
    if folder.is_dir():
        checkpoint, problem = _verified(folder)
        if checkpoint is not None:
            logger.info("%s: using the cached copy in %s", label, folder)
            return checkpoint
        logger.warning("%s: the cached copy in %s failed its check (%s); downloading it again", label, folder, problem)
        _discard(folder)
    logger.info("%s: downloading into the model cache %s", label, folder)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=models_dir))
    try:
        checkpoint = download(staging / MODEL_DIR)
        _write_manifest(staging, checkpoint)
        # A folder rename is atomic: a reader sees no copy or a whole one.
        os.rename(staging, folder)
        return folder / checkpoint.relative_to(staging)
    except OSError:
        if not (folder / MANIFEST).is_file():
            raise
        # Another process renamed its copy of the same version first: use that one.
        logger.info("%s: another process cached it first", label)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    checkpoint, problem = _verified(folder)
    if checkpoint is None:
        raise PipelineError(f"{label}: the copy another process cached in {folder} failed its check ({problem}); "
                            "try again")
    return checkpoint


def _write_manifest(entry: Path, checkpoint: Path) -> None:
    """Record every file's size and the checkpoint's sha256, relative to the cache entry."""
    files = {str(p.relative_to(entry)): p.stat().st_size for p in sorted(entry.rglob("*")) if p.is_file()}
    manifest = {"checkpoint": str(checkpoint.relative_to(entry)), "checkpoint_sha256": file_sha256(checkpoint),
                "files": files}
    write_text_atomic(entry / MANIFEST, json.dumps(manifest, indent=1))


def _verified(entry: Path) -> tuple[Path | None, str]:
    """(the checkpoint, "") when the copy matches its manifest, else (``None``, what is wrong)."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        for name, size in manifest["files"].items():
            path = entry / name
            if not path.is_file():
                return None, f"{name} is missing"
            if path.stat().st_size != size:
                return None, f"{name} has a different size"
        checkpoint = entry / manifest["checkpoint"]
        if file_sha256(checkpoint) != manifest["checkpoint_sha256"]:
            return None, "the checkpoint's sha256 differs"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        # The class only: the message would repeat paths.
        return None, f"manifest or checkpoint unreadable ({exc.__class__.__name__})"
    return checkpoint, ""


def _discard(folder: Path) -> None:
    """Move a bad copy out of the way (atomically), then delete it; another process may have done so already."""
    trash = folder.with_name(f".discard-{uuid.uuid4().hex}")
    try:
        os.rename(folder, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)
