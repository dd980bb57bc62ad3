"""A per-user cache of registered model versions: each one is downloaded once and reused.

A registered version is immutable, so its copy stays good for as long as it passes its
check. The layout under the cache root (``UNET_PIPELINE_CACHE``, else
``$XDG_CACHE_HOME/unet-pipeline``, else ``~/.cache/unet-pipeline``)::

    models/<key>/manifest.json   model name and version, file names and sizes, the checkpoint and its sha256
    models/<key>/model/...       the model's artifacts as MLflow downloaded them
    models/<key>/last-used       touched on every use: its time is the copy's last use
    models/<key>/in-use.lock     a loader holds a shared lock on it (flock) until it has loaded the checkpoint
    models/.download-*/          a download in progress (renamed to <key> when complete)
    models/.discard-*/           a copy that failed its check or was evicted, being deleted

The key hashes the registry URI (without credentials), the model name and version, and the
version's run id and creation time: a reinstalled server that hands out the same name and
version number again gets a new key instead of the old copy.

The cache has a size cap: ``UNET_PIPELINE_CACHE_MAX_GB`` when set (a per-machine setting, so it
overrides the config), else ``registry.model_cache_max_gb`` of the config (``run``, ``ensemble``;
``predict``, ``evaluate`` and ``pacs`` with ``--config``), else that key's default. After each use
the copies used longest ago are deleted until the rest fit; the copy just used is never deleted,
so a cap smaller than one model keeps just that one. ``unet-pipeline cache list`` shows the copies, ``cache clear`` deletes them.

A copy another process is loading is never deleted either: :func:`cached_checkpoint` takes a
shared ``flock`` on the copy's ``in-use.lock`` (taken in the download folder before it is renamed
into place, so a fresh copy is never unheld) and keeps it until the caller has read the checkpoint
(:func:`release`, or the end of the process). Eviction and ``cache clear`` take the lock exclusively
without waiting and pass over a copy whose lock is held; a later eviction deletes it once it is free.
A loader that waited on the lock while an evictor renamed the copy away sees its lock file gone and
downloads again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pipeline.config import ConfigError, RegistryConfig
from pipeline.data import cache_root, file_sha256, write_text_atomic
from pipeline.errors import PipelineError
from pipeline.registry.server import redact_uri

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MODEL_DIR = "model"
LAST_USED = "last-used"
IN_USE = "in-use.lock"
#: the cache's size cap in GB (10^9 bytes); overrides ``registry.model_cache_max_gb``.
MAX_GB_ENV = "UNET_PIPELINE_CACHE_MAX_GB"
#: ``registry.model_cache_max_gb`` where no config is given (``predict``, ``evaluate``, ``pacs`` without ``--config``).
DEFAULT_MAX_GB = RegistryConfig.model_cache_max_gb
GB = 10**9

# Copy folder -> the descriptors holding its shared lock in this process (one per unreleased use).
_HELD: dict[str, list[int]] = {}


def max_gb(configured: float | None = DEFAULT_MAX_GB) -> tuple[float | None, str]:
    """The cache's size cap in GB (``None``: no cap) and where it came from.

    Args:
        configured: ``registry.model_cache_max_gb`` of the loaded config (its default when none is).

    Raises:
        ConfigError: ``UNET_PIPELINE_CACHE_MAX_GB`` is set but not a number >= 0 (or ``none``).
    """
    raw = os.environ.get(MAX_GB_ENV, "").strip()
    if not raw:
        return configured, "registry.model_cache_max_gb"
    if raw.lower() in ("none", "null"):
        return None, MAX_GB_ENV
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # NaN too
        raise ConfigError(f"{MAX_GB_ENV}: '{raw}' is not a size in GB (a number >= 0, or none for no cap)")
    return value, MAX_GB_ENV


@dataclass(frozen=True)
class CacheEntry:
    """One cached model version.

    Args:
        key: its folder name (:func:`cache_key`).
        name: the registered model name (empty for copies cached before names were recorded).
        version: the registered version.
        size_bytes: the bytes its files take.
        last_used: when it was last used (seconds since the epoch).
    """

    key: str
    name: str
    version: str
    size_bytes: int
    last_used: float


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


def cached_checkpoint(models_dir: Path, key: str, label: str, download: Callable[[Path], Path],
                      identity: tuple[str, str] = ("", ""), cap_gb: float | None = DEFAULT_MAX_GB) -> Path:
    """The checkpoint of a cached copy that passes its check, downloading the copy first when needed; then
    the copies used longest ago are evicted until the cache fits its cap (never this one).

    Args:
        models_dir: the cache's ``models`` folder (:func:`usable_models_dir`).
        key: the version's :func:`cache_key`.
        label: the model in words for the log (name and version; never a patient's data).
        download: downloads the model into the folder it is given and returns its checkpoint there.
        identity: the registered model's name and version, recorded for ``unet-pipeline cache list``.
        cap_gb: ``registry.model_cache_max_gb`` (:func:`max_gb` lets the environment override it).

    Returns:
        The checkpoint inside the cache: read it, never change or delete it. The copy stays held
        (no process evicts it) until :func:`release` is called with it, or this process ends.
    """
    cap, _ = max_gb(cap_gb)
    checkpoint = _checkpoint(models_dir, key, label, download, identity)
    evict(models_dir, cap, keep=key)
    return checkpoint


def _checkpoint(models_dir: Path, key: str, label: str, download: Callable[[Path], Path],
                identity: tuple[str, str]) -> Path:
    folder = models_dir / key
    if folder.is_dir() and _hold(folder):
        checkpoint, problem = _verified(folder)
        if checkpoint is not None:
            logger.info("%s: using the cached copy in %s", label, folder)
            _touch(folder)
            return checkpoint
        _release_folder(folder)
        logger.warning("%s: the cached copy in %s failed its check (%s); downloading it again", label, folder, problem)
        _discard(folder)
    logger.info("%s: downloading into the model cache %s", label, folder)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=models_dir))
    try:
        checkpoint = download(staging / MODEL_DIR)
        _write_manifest(staging, checkpoint, identity)
        _touch(staging)
        # Held before it is in place (the lock is on the file, which the rename keeps): no evictor
        # ever sees this copy unheld.
        fd = _lock(staging / IN_USE, fcntl.LOCK_SH)
        try:
            # A folder rename is atomic: a reader sees no copy or a whole one.
            os.rename(staging, folder)
        except OSError:
            os.close(fd)
            raise
        _HELD.setdefault(str(folder), []).append(fd)
        return folder / checkpoint.relative_to(staging)
    except OSError:
        if not (folder / MANIFEST).is_file():
            raise
        # Another process renamed its copy of the same version first: use that one.
        logger.info("%s: another process cached it first", label)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not _hold(folder):
        raise PipelineError(f"{label}: the copy another process cached in {folder} was evicted at once; try again")
    checkpoint, problem = _verified(folder)
    if checkpoint is None:
        _release_folder(folder)
        raise PipelineError(f"{label}: the copy another process cached in {folder} failed its check ({problem}); "
                            "try again")
    _touch(folder)
    return checkpoint


def _lock(path: Path, operation: int) -> int:
    """An open descriptor of ``path`` (created if missing) locked with ``operation``; closing it unlocks."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, operation)
    except OSError:
        os.close(fd)
        raise
    return fd


def _hold(folder: Path) -> bool:
    """Take a shared lock on a copy, so no process evicts it; ``False`` when it was evicted meanwhile."""
    path = folder / IN_USE
    try:
        fd = _lock(path, fcntl.LOCK_SH)  # waits only while an evictor renames the copy away
    except OSError:
        return False  # the folder is gone
    try:
        current = os.stat(path)
    except OSError:
        current = None
    if current is None or not os.path.samestat(os.fstat(fd), current):
        os.close(fd)  # the lock is on the file of a copy that was moved away while this waited
        return False
    _HELD.setdefault(str(folder), []).append(fd)
    return True


def _release_folder(folder: Path) -> None:
    fds = _HELD.get(str(folder))
    if fds:
        os.close(fds.pop())
        if not fds:
            del _HELD[str(folder)]


def release(checkpoint: Path) -> None:
    """Let the cache evict the copy holding ``checkpoint`` again (once this process's other uses of it are released).

    Call it once the checkpoint is loaded; a path outside the cache, or one already released, is ignored.

    Args:
        checkpoint: a path :func:`cached_checkpoint` returned.
    """
    for folder in [Path(f) for f in _HELD]:
        if folder in Path(checkpoint).parents:
            _release_folder(folder)
            return


def _touch(entry: Path) -> None:
    """Mark a copy as used now (eviction goes by last use, not by when it was downloaded)."""
    try:
        (entry / LAST_USED).touch()
    except OSError:
        pass  # evicted meanwhile by another process: the caller already holds what it needs


def entries(models_dir: Path) -> list[CacheEntry]:
    """Every complete copy in the cache, the one used longest ago first.

    Args:
        models_dir: the cache's ``models`` folder.
    """
    found = []
    for folder in sorted(models_dir.iterdir()) if models_dir.is_dir() else []:
        if folder.name.startswith(".") or not folder.is_dir():
            continue  # downloads in progress and copies being deleted
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            name, version = str(manifest.get("name", "")), str(manifest.get("version", ""))
        except (OSError, ValueError, AttributeError):
            name = version = ""
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        stamp = folder / LAST_USED
        try:
            used = (stamp if stamp.exists() else folder).stat().st_mtime
        except OSError:
            continue  # deleted meanwhile
        found.append(CacheEntry(folder.name, name, version, size, used))
    return sorted(found, key=lambda e: (e.last_used, e.key))


def evict(models_dir: Path, cap: float | None, keep: str | None = None) -> list[CacheEntry]:
    """Delete the copies used longest ago until the cache holds at most ``cap`` GB; never ``keep``.

    Args:
        models_dir: the cache's ``models`` folder.
        cap: the cap in GB (``None``: no cap, nothing is deleted).
        keep: the key of the copy in use.

    Returns:
        The copies deleted.
    """
    if cap is None:
        return []
    found = entries(models_dir)
    total = sum(e.size_bytes for e in found)
    evicted = []
    for entry in found:
        if total <= cap * GB:
            break
        if entry.key == keep:
            continue
        if not _discard_unless_held(models_dir / entry.key):
            logger.info("model cache: kept %s version %s over the cap: a process is loading it",
                        entry.name or entry.key, entry.version or "?")
            continue
        total -= entry.size_bytes
        evicted.append(entry)
        logger.info("model cache: evicted %s version %s (%.2f GB, the copy used longest ago) to stay under %g GB",
                    entry.name or entry.key, entry.version or "?", entry.size_bytes / GB, cap)
    return evicted


def clear(models_dir: Path, name: str | None = None, version: str | None = None) -> list[CacheEntry]:
    """Delete cached copies: all, or those of one model (and version).

    Args:
        models_dir: the cache's ``models`` folder.
        name: only this registered model's copies.
        version: only this version (with ``name``).

    Returns:
        The copies deleted (a copy a process is loading is left, see :func:`evict`).
    """
    chosen = [e for e in entries(models_dir) if (name is None or e.name == name)
              and (version is None or e.version == str(version))]
    return [entry for entry in chosen if _discard_unless_held(models_dir / entry.key)]


def _write_manifest(entry: Path, checkpoint: Path, identity: tuple[str, str] = ("", "")) -> None:
    """Record the model's identity, every file's size and the checkpoint's sha256, relative to the cache entry."""
    files = {str(p.relative_to(entry)): p.stat().st_size for p in sorted(entry.rglob("*")) if p.is_file()}
    manifest = {"name": identity[0], "version": str(identity[1]), "checkpoint": str(checkpoint.relative_to(entry)),
                "checkpoint_sha256": file_sha256(checkpoint), "files": files}
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


def _discard_unless_held(folder: Path) -> bool:
    """Delete a copy unless a loader (in any process, this one included) holds it; whether it was deleted."""
    try:
        fd = _lock(folder / IN_USE, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # held
    except OSError:
        return False  # gone: another process deleted it
    try:
        trash = folder.with_name(f".discard-{uuid.uuid4().hex}")
        try:
            os.rename(folder, trash)
        except FileNotFoundError:
            return False
    finally:
        os.close(fd)  # a loader waiting on the lock now finds the lock file gone, and downloads again
    shutil.rmtree(trash, ignore_errors=True)
    return True


def _discard(folder: Path) -> None:
    """Move a bad copy out of the way (atomically), then delete it; another process may have done so already."""
    trash = folder.with_name(f".discard-{uuid.uuid4().hex}")
    try:
        os.rename(folder, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def list_cache(configured: float | None = DEFAULT_MAX_GB, config_file: str | None = None) -> list[str]:
    """``unet-pipeline cache list``: one line per cached version (used longest ago first), then the total and the cap.

    Args:
        configured: ``registry.model_cache_max_gb`` of ``config_file`` (its default when there is none).
        config_file: the config the cap was read from, to say so.
    """
    folder = cache_root() / "models"
    cap, source = max_gb(configured)
    if source != MAX_GB_ENV:
        source = f"{source} in {config_file}" if config_file else f"the default of {source}"
    found = entries(folder)
    lines = [f"{'model':<30} {'version':>8} {'size GB':>8}  {'last used':<19}  key"] if found else []
    for e in found:
        used = datetime.fromtimestamp(e.last_used).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(f"{e.name or '?':<30} {e.version or '?':>8} {e.size_bytes / GB:>8.3f}  {used:<19}  {e.key}")
    total = sum(e.size_bytes for e in found) / GB
    lines.append(f"{len(found)} cached model version(s), {total:.3f} GB in {folder}; cap: "
                 f"{'none' if cap is None else f'{cap:g} GB'} ({source})")
    return lines


def clear_cache(name: str | None = None, version: str | None = None) -> str:
    """``unet-pipeline cache clear``: delete cached versions (all, or one model's) and say what went.

    Args:
        name: only this registered model's versions.
        version: only this version (with ``name``).

    Raises:
        ConfigError: a version without a model name.
    """
    if version is not None and name is None:
        raise ConfigError("cache clear: --version needs --model")
    folder = cache_root() / "models"
    removed = clear(folder, name, version)
    which = (f" of {name}" + (f" version {version}" if version else "")) if name else ""
    return (f"Deleted {len(removed)} cached model version(s){which}, "
            f"{sum(e.size_bytes for e in removed) / GB:.2f} GB, from {folder}")
