"""Files written so that a reader never sees half of one: atomic text, atomic files, staged sets.

Every file is written under a temporary name in the target folder, flushed and
renamed; it gets ordinary permissions (what the process's umask allows, e.g. 0644),
not the 0600 of a temporary file, so colleagues in the same group can read it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Staged:
    """Files written under temporary names and renamed together: a case's outputs appear all or none.

    Use as a context manager; :meth:`path` gives a temporary path for a final one. On a
    clean exit every file is flushed, given ordinary permissions and renamed into
    place; on an error every temporary file is removed.
    """

    def __init__(self) -> None:
        self._files: list[tuple[Path, Path]] = []

    def path(self, final: Path, suffix: str = "") -> Path:
        """A temporary path in ``final``'s folder, committed to ``final`` on success.

        Args:
            final: the file to produce.
            suffix: ending the temporary name needs (e.g. ``.nii.gz`` for nibabel).
        """
        final.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{suffix}", dir=final.parent)
        os.close(handle)
        self._files.append((Path(name), final))
        return Path(name)

    def written(self, final: Path) -> Path:
        """Where ``final``'s content is now, before the commit (a later file of the set may need to read it).

        Args:
            final: a file already written through :meth:`path`.
        """
        for tmp, target in self._files:
            if target == final:
                return tmp
        raise KeyError(final)

    def __enter__(self) -> Staged:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            for tmp, _ in self._files:
                tmp.unlink(missing_ok=True)
            return
        mode = 0o666 & ~_umask()
        try:
            for tmp, _ in self._files:
                with open(tmp, "rb+") as fp:
                    os.fsync(fp.fileno())
                # mkstemp creates 0600: give the file what a normally created file would get.
                os.chmod(tmp, mode)
        except BaseException:
            for tmp, _ in self._files:
                tmp.unlink(missing_ok=True)
            raise
        for tmp, final in self._files:
            os.replace(tmp, final)


def write_text_atomic(path: Path, text: str) -> None:
    """Write, fsync and rename, so a reader (or a crash) sees the old file or the new one, never half of one.

    The temporary name carries the process id: processes writing the same file (ranks of one job) do not
    collide.

    Args:
        path: the file.
        text: its new content.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    # The rename itself is only durable once the directory entry is on disk.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextmanager
def atomic_file(path: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` with ordinary permissions.

    Args:
        path: the final file.
        suffix: ending the temporary name needs (e.g. ``.nii.gz`` for nibabel).
    """
    with Staged() as staged:
        yield staged.path(path, suffix)


def save_file(path: Path, staged: Staged | None, suffix: str, write: Callable[[Path], object]) -> None:
    """Write ``path`` through ``write(temporary_path)``: as one of ``staged``, or on its own atomically.

    Args:
        path: the file to produce.
        staged: the staged set it belongs to; ``None``: written and renamed on its own.
        suffix: ending the temporary name needs (e.g. ``.nii.gz`` for nibabel).
        write: writes the content to the path it is given.
    """
    if staged is not None:
        write(staged.path(path, suffix))
        return
    with atomic_file(path, suffix) as tmp:
        write(tmp)


#: The per-user cache folder (registered models, compiled networks); ``~/.cache/unet-pipeline`` by default.
CACHE_ENV = "UNET_PIPELINE_CACHE"


def cache_root() -> Path:
    """The cache root: ``UNET_PIPELINE_CACHE``, else ``$XDG_CACHE_HOME/unet-pipeline``, else ``~/.cache/unet-pipeline``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "unet-pipeline"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's content, hex, read in 1 MiB blocks.

    Args:
        path: the file.
    """
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
