"""NIfTI reading and writing: validated loading and atomic writing of ``.nii`` / ``.nii.gz`` files.

Every bad input surfaces as :class:`~transforms.errors.InputDataError` naming the file and
the problem in plain words, never as a raw nibabel / gzip traceback.

Conventions:

* Arrays are in voxel index order ``(i, j, k)`` and affines are RAS world affines (the
  nibabel / MONAI convention).
* The voxel data is read at load time (nibabel is lazy, so a truncated file would only
  fail later) and checked for NaN/Inf values; the affine must be finite and invertible.
* Only 3D images are accepted by the pipeline: an image whose extra dimensions are all 1
  (e.g. ``(X, Y, Z, 1)``) is squeezed to 3D; a 2D or a real 4D image is refused.
* Label maps are written atomically (temporary file, fsync, ``os.replace``).
"""

from __future__ import annotations

import os
import tempfile
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from transforms.errors import InputDataError, short_reason

__all__ = ["NIFTI_SUFFIXES", "load_nifti", "write_nifti_atomic"]

#: File name endings read as NIfTI.
NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")


def _is_nifti_path(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _load_nifti_checked(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Load a NIfTI file, forcing the voxel data to be read; return image and data."""
    if not path.exists():
        raise InputDataError(path, "file not found")
    if not path.is_file():
        raise InputDataError(path, "is not a file (expected a .nii or .nii.gz file)")
    try:
        image = nib.load(str(path))
    except Exception as error:  # ImageFileError, EOFError, zlib.error, OSError, ...
        raise InputDataError(path, f"cannot be read as a NIfTI image ({short_reason(error, path)})") from None
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise InputDataError(path, f"is not a NIfTI image (nibabel reads it as {type(image).__name__})")
    try:
        data = np.asanyarray(image.dataobj)
    except (EOFError, OSError, ValueError, zlib.error, MemoryError) as error:
        raise InputDataError(
            path, f"is truncated or corrupt: its voxel data cannot be read ({short_reason(error, path)})"
        ) from None
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputDataError(path, "has an invalid affine (non-finite or singular voxel-to-world matrix)")
    if data.dtype.kind in "fc":
        finite = np.isfinite(data)
        if not finite.all():
            n_nan = int(np.isnan(data).sum())
            n_inf = int(finite.size - finite.sum()) - n_nan
            raise InputDataError(
                path, f"contains non-finite intensities ({n_nan} NaN and {n_inf} Inf voxels); fix the file"
            )
    return image, data


def load_nifti(path: str | Path) -> nib.Nifti1Image:
    """Load and validate a NIfTI file (``.nii`` or ``.nii.gz``).

    The voxel data is read immediately (nibabel is lazy, so a truncated file would only
    fail later) and checked for NaN/Inf values; the returned image holds it in memory.
    Dimensionality is not checked here (see :class:`MedicalImageReader`).

    Args:
        path: the NIfTI file.

    Returns:
        A nibabel NIfTI image (``Nifti1Image`` or ``Nifti2Image``) whose ``dataobj`` is
        the in-memory, scaled voxel array.

    Raises:
        InputDataError: missing file, not NIfTI, truncated or corrupt data, invalid
            affine, NaN/Inf intensities.
    """
    image, data = _load_nifti_checked(Path(path))
    loaded = type(image)(data, image.affine, image.header)
    loaded.set_data_dtype(data.dtype)
    return loaded


def _as_3d(path: Path, data: np.ndarray) -> np.ndarray:
    shape = tuple(int(s) for s in data.shape)
    if len(shape) > 3 and all(s == 1 for s in shape[3:]):
        data = data.reshape(shape[:3])
    elif len(shape) == 4:
        raise InputDataError(path, f"is 4D (shape {shape}), expected a 3D image")
    elif len(shape) != 3:
        raise InputDataError(path, f"is {len(shape)}D (shape {shape}), expected a 3D image")
    if 0 in data.shape:
        raise InputDataError(path, f"is empty (shape {shape})")
    return data


# --------------------------------------------------------------------------- writing


def write_nifti_atomic(array: Any, affine: np.ndarray, path: str | Path) -> Path:
    """Write a 3D label map (or image) as NIfTI without ever leaving a half-written file.

    The image is written to a temporary file in the target folder, flushed to disk, then
    moved onto ``path`` with ``os.replace`` (atomic on one file system). Boolean arrays
    are stored as uint8 and 64-bit integer arrays as int32 (NIfTI readers handle 64-bit
    integers poorly); the affine is stored as both qform and sform (scanner code).

    Args:
        array: voxel array in (i, j, k) order (numpy array, or a tensor convertible
            with ``numpy.asarray``; torch tensors are moved to the CPU).
        affine: 4x4 RAS affine, as in the meta dict of a loaded image.
        path: target ``.nii`` or ``.nii.gz`` file; missing parent folders are created.

    Returns:
        The written path.

    Raises:
        ValueError: ``path`` is not a NIfTI file name, the affine is not 4x4, or a
            64-bit integer array does not fit in int32.
    """
    path = Path(path)
    if not _is_nifti_path(path):
        raise ValueError(f"{path}: output must end with .nii or .nii.gz")
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    data = np.asarray(array)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"{path}: affine must be 4x4, got shape {affine.shape}")
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    elif data.dtype.kind in "iu" and data.dtype.itemsize == 8:
        info = np.iinfo(np.int32)
        if data.size and (data.min() < info.min or data.max() > info.max):
            raise ValueError(f"{path}: integer values do not fit in int32")
        data = data.astype(np.int32)
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)

    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(handle)
    try:
        nib.save(image, tmp_name)
        with open(tmp_name, "rb+") as fp:
            os.fsync(fp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path
