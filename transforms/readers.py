"""Robust loading of NIfTI files and DICOM series, usable from MONAI's ``LoadImage``.

Every stage of the pipeline loads images through :class:`MedicalImageReader`, so all
bad inputs surface as :class:`~transforms.errors.InputDataError` naming the file or
folder at fault and the problem in plain words, never as a raw nibabel / SimpleITK /
pydicom traceback.

The format-specific work lives in :mod:`transforms.dicom` (series listing and reading;
the folder scan and header checks in :mod:`transforms.dicom_files`, the slice geometry
checks in :mod:`transforms.dicom_geometry`) and :mod:`transforms.nifti` (NIfTI checks,
atomic writing); their public names are re-exported here, so ``from transforms.readers
import read_dicom_series`` keeps working.

Conventions:

* Arrays are in voxel index order ``(i, j, k)``: the fastest axis of SimpleITK (x, the
  DICOM column index) is the first axis of the array, as with MONAI's ``ITKReader``
  (``reverse_indexing=True``) and nibabel.
* Affines are RAS world affines (the nibabel / MONAI convention); DICOM's LPS
  geometry is converted with :data:`LPS_TO_RAS`.
* Only 3D images are accepted. A NIfTI whose extra dimensions are all 1 (e.g.
  ``(X, Y, Z, 1)``) is squeezed to 3D; a 2D NIfTI, a real 4D NIfTI, a single-slice DICOM
  series and multi-frame (enhanced) DICOM files are refused with a clear message.
* No patient-identifying DICOM attribute is stored, returned, logged or put in a
  message (see :mod:`transforms.dicom`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from monai.data.image_reader import ImageReader
from monai.utils import MetaKeys, SpaceKeys

from transforms.dicom import (
    LPS_TO_RAS,
    SeriesInfo,
    _read_series,
    affine_from_sitk,
    list_dicom_series,
    read_dicom_series,
    series_files,
)
from transforms.errors import InputDataError
from transforms.nifti import NIFTI_SUFFIXES, _as_3d, _is_nifti_path, _load_nifti_checked, load_nifti, write_nifti_atomic

__all__ = [
    "LPS_TO_RAS",
    "NIFTI_SUFFIXES",
    "LoadedImage",
    "MedicalImageReader",
    "SeriesInfo",
    "affine_from_sitk",
    "list_dicom_series",
    "load_image",
    "load_nifti",
    "read_dicom_series",
    "series_files",
    "write_nifti_atomic",
]


@dataclass
class LoadedImage:
    """A validated image: voxel array in (i, j, k) order plus MONAI metadata.

    Args:
        array: voxel values, shape ``spatial_shape``, axes in (i, j, k) index order.
        meta: MONAI metadata dict (``affine`` in RAS, ``spatial_shape``, ...).
    """

    array: np.ndarray
    meta: dict[str, Any]


@dataclass
class _DeferredError:
    """An error raised while reading, re-raised by ``MedicalImageReader.get_data``."""

    error: BaseException


# --------------------------------------------------------------------------- MONAI


def _base_meta(path: Path, affine: np.ndarray, shape: tuple[int, ...]) -> dict[str, Any]:
    return {
        MetaKeys.AFFINE: affine.copy(),
        MetaKeys.ORIGINAL_AFFINE: affine.copy(),
        MetaKeys.SPATIAL_SHAPE: np.asarray(shape),
        MetaKeys.SPACE: SpaceKeys.RAS,
        MetaKeys.ORIGINAL_CHANNEL_DIM: "no_channel",
        "spacing": np.sqrt((affine[:3, :3] ** 2).sum(axis=0)),
        "filename_or_obj": str(path),
    }


def _load_nifti_for_monai(path: Path) -> LoadedImage:
    image, data = _load_nifti_checked(path)
    data = _as_3d(path, data)
    affine = np.asarray(image.affine, dtype=np.float64)
    meta = _base_meta(path, affine, data.shape)
    meta["source_format"] = "nifti"
    return LoadedImage(array=data, meta=meta)


def _load_dicom_for_monai(folder: Path, series_uid: str | None) -> LoadedImage:
    image, info = _read_series(folder, series_uid)
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (z, y, x) -> (i, j, k)
    if array.dtype.kind in "fc" and not np.all(np.isfinite(array)):
        raise InputDataError(folder, "contains non-finite (NaN/Inf) intensities")
    meta = _base_meta(folder, affine_from_sitk(image), array.shape)
    meta["source_format"] = "dicom"
    if info.modality:
        meta["modality"] = info.modality
    return LoadedImage(array=array, meta=meta)


def load_image(path: str | Path, series_uid: str | None = None) -> LoadedImage:
    """Load a NIfTI file or a DICOM series folder as a validated 3D image.

    Args:
        path: a ``.nii``/``.nii.gz`` file or a folder holding one DICOM series.
        series_uid: SeriesInstanceUID to pick when a DICOM folder holds several series.

    Returns:
        The voxel array in (i, j, k) order and its MONAI metadata (RAS affine).

    Raises:
        InputDataError: any problem with the input (see :func:`load_nifti` and
            :func:`read_dicom_series`), or a path that is neither.
    """
    path = Path(path)
    if path.is_dir():
        return _load_dicom_for_monai(path, series_uid)
    if _is_nifti_path(path):
        return _load_nifti_for_monai(path)
    if not path.exists():
        raise InputDataError(path, "not found")
    raise InputDataError(path, "unsupported input: expected a .nii/.nii.gz file or a folder holding a DICOM series")


class MedicalImageReader(ImageReader):
    """MONAI image reader for NIfTI files and DICOM series folders, with validation.

    Use it as ``LoadImage(reader=MedicalImageReader(), image_only=True)`` or
    ``LoadImaged(keys=["image"], reader=MedicalImageReader())``. The result is a
    MetaTensor with array axes in (i, j, k) voxel order and a RAS ``affine``; the meta
    dict holds ``affine``, ``original_affine``, ``spatial_shape``, ``space``,
    ``original_channel_dim`` (``"no_channel"``), ``spacing``, ``source_format``,
    ``filename_or_obj`` and, for DICOM, ``modality``; never patient fields.

    A sequence of paths is read as a multi-channel image: all must lie on the same grid
    (same shape and affine) and are stacked on a new first axis
    (``original_channel_dim`` = 0).

    Errors: ``LoadImage`` swallows exceptions raised by ``read`` when a reader is given
    explicitly and falls back to its other readers (which would then load the image
    without these checks, or fail with an unhelpful message). So ``read`` never raises
    for a bad input: it defers the :class:`InputDataError` to ``get_data``, which
    ``LoadImage`` calls outside its try block, so the error reaches the caller intact
    (a MONAI ``Compose`` wraps it in a RuntimeError whose ``__cause__`` is it).

    Args:
        series_uid: SeriesInstanceUID to read from DICOM folders holding several series.
    """

    def __init__(self, series_uid: str | None = None) -> None:
        """Create the reader; see the class docstring for ``series_uid``."""
        super().__init__()
        self.series_uid = series_uid

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        """Tell whether every given path is a NIfTI file name or an existing folder.

        Args:
            filename: one path or a sequence of paths.

        Returns:
            True when this reader can handle all of them.
        """
        names = [filename] if isinstance(filename, str | os.PathLike) else list(filename)
        return bool(names) and all(_is_nifti_path(n) or Path(n).is_dir() for n in names)

    def read(
        self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs: Any
    ) -> LoadedImage | _DeferredError | list[LoadedImage | _DeferredError]:
        """Load and validate the image(s); problems are deferred to :meth:`get_data`.

        Args:
            data: one path, or a sequence of paths (one per channel).
            kwargs: ``series_uid`` overrides the reader's setting for this call.

        Returns:
            One loaded image per path (a single object for a single path); a path that
            failed yields a placeholder whose error :meth:`get_data` raises.
        """
        series_uid = kwargs.get("series_uid", self.series_uid)
        paths = [data] if isinstance(data, str | os.PathLike) else list(data)
        results: list[LoadedImage | _DeferredError] = []
        for path in paths:
            try:
                results.append(load_image(path, series_uid))
            except Exception as error:  # re-raised, traceback intact, by get_data
                results.append(_DeferredError(error))
        return results[0] if len(results) == 1 else results

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        """Return the voxel array and meta dict of what :meth:`read` returned.

        Args:
            img: the return value of :meth:`read`.

        Returns:
            ``(array, meta)``: array of shape ``spatial_shape`` (or ``(C, *spatial_shape)``
            for several paths), meta as described in the class docstring.

        Raises:
            InputDataError: the input was bad (deferred from :meth:`read`), or channels
                lie on different grids.
        """
        items = list(img) if isinstance(img, list | tuple) else [img]
        if not items:
            raise ValueError("MedicalImageReader.get_data received no image")
        for item in items:
            if isinstance(item, _DeferredError):
                raise item.error
        loaded: list[LoadedImage] = items
        if len(loaded) == 1:
            return loaded[0].array, dict(loaded[0].meta)
        reference = loaded[0]
        for other in loaded[1:]:
            if other.array.shape != reference.array.shape or not np.allclose(
                other.meta[MetaKeys.AFFINE], reference.meta[MetaKeys.AFFINE], atol=1e-4
            ):
                raise InputDataError(
                    other.meta["filename_or_obj"],
                    f"channel is not on the same voxel grid as {reference.meta['filename_or_obj']} "
                    f"(shape {other.array.shape} vs {reference.array.shape}, or a different affine)",
                )
        meta = dict(reference.meta)
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
        return np.stack([item.array for item in loaded], axis=0), meta
