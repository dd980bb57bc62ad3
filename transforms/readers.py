"""Robust loading of NIfTI files and DICOM series, usable from MONAI's ``LoadImage``.

Every stage of the pipeline loads images through :class:`MedicalImageReader`, so all
bad inputs surface as :class:`~pipeline.errors.InputDataError` naming the file or
folder at fault and the problem in plain words, never as a raw nibabel / SimpleITK /
pydicom traceback.

Conventions:

* Arrays are in voxel index order ``(i, j, k)``: the fastest axis of SimpleITK (x, the
  DICOM column index) is the first axis of the array, as with MONAI's ``ITKReader``
  (``reverse_indexing=True``) and nibabel.
* Affines are RAS world affines (the nibabel / MONAI convention). SimpleITK and DICOM
  speak LPS: ``affine_ras = diag(-1, -1, 1, 1) @ affine_lps`` with
  ``affine_lps[:3, :3] = direction @ diag(spacing)`` and ``affine_lps[:3, 3] = origin``.
* Only 3D images are accepted. A NIfTI whose extra dimensions are all 1 (e.g.
  ``(X, Y, Z, 1)``) is squeezed to 3D; a 2D NIfTI, a real 4D NIfTI, a single-slice DICOM
  series and multi-frame (enhanced) DICOM files are refused with a clear message.
* DICOM slices are ordered by their position along the slice normal
  (``dot(ImagePositionPatient, cross(row, col))``), never by file name, and the slice
  positions are checked here (missing, duplicate, unevenly spaced or sheared slices are
  errors; SimpleITK would only print a warning).
* No patient-identifying DICOM attribute (PatientName, PatientID, PatientBirthDate,
  AccessionNumber, InstitutionName, ...) is stored, returned, logged or put in a message:
  only the series UID, series description, modality and geometry are read from headers.
"""

from __future__ import annotations

import math
import os
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk
from monai.data.image_reader import ImageReader
from monai.utils import MetaKeys, SpaceKeys
from pydicom.errors import InvalidDicomError

from pipeline.errors import InputDataError

__all__ = [
    "LPS_TO_RAS",
    "NIFTI_SUFFIXES",
    "LoadedImage",
    "MedicalImageReader",
    "SeriesInfo",
    "affine_from_sitk",
    "list_dicom_series",
    "load_nifti",
    "read_dicom_series",
    "write_nifti_atomic",
]

#: File name endings read as NIfTI.
NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")
#: Converts an LPS affine (DICOM, SimpleITK) to RAS (nibabel, MONAI) and back.
LPS_TO_RAS: np.ndarray = np.diag([-1.0, -1.0, 1.0, 1.0])

# Files with these endings are expected to be DICOM: failing to parse one is an error
# rather than a silently ignored stray file.
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
# Slice spacing tolerance: a gap may deviate from the typical spacing by the larger of
# 1 % of that spacing and 0.01 mm.
_SPACING_REL_TOL = 0.01
_SPACING_ABS_TOL_MM = 0.01
# Two slices closer than this along the normal are duplicates.
_DUPLICATE_TOL_MM = 0.01
# ImageOrientationPatient cosines are stored with ~6 decimals.
_ORIENTATION_TOL = 1e-4
# In-plane shift between slices (gantry tilt): larger of 0.01 mm and 1 % of a pixel.
_SHEAR_ABS_TOL_MM = 0.01
_SHEAR_REL_TOL = 0.01


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series found in a folder (no patient-identifying fields).

    Args:
        uid: SeriesInstanceUID, what ``--series-uid`` selects.
        description: SeriesDescription ("" when absent).
        modality: Modality, e.g. "CT" or "MR" ("" when absent).
        num_files: number of image files of this series in the folder.
    """

    uid: str
    description: str
    modality: str
    num_files: int

    def describe(self) -> str:
        """One-line human description used in error messages.

        Returns:
            e.g. ``'1.2.3 ("T1post", MR, 24 slices)'``.
        """
        description = self.description or "no description"
        modality = self.modality or "unknown modality"
        return f'{self.uid} ("{description}", {modality}, {self.num_files} slices)'


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


@dataclass
class _SliceHeader:
    """What is needed from one DICOM file's header (never patient fields)."""

    path: Path
    series_uid: str
    description: str
    modality: str
    problem: str | None = None  # set when the file cannot be used as a slice
    rows: int = 0
    columns: int = 0
    orientation: np.ndarray | None = None  # 6 direction cosines (row, column)
    position: np.ndarray | None = None  # ImagePositionPatient, LPS mm
    pixel_spacing: np.ndarray | None = None  # (between rows, between columns) mm
    frames: int = 1
    rescale: tuple[str, str] = ("", "")


def affine_from_sitk(image: sitk.Image) -> np.ndarray:
    """Build the RAS world affine of a 3D SimpleITK image.

    Args:
        image: a 3D SimpleITK image (LPS geometry).

    Returns:
        4x4 float64 RAS affine mapping (i, j, k, 1) voxel indices to world mm.
    """
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = direction @ np.diag(np.asarray(image.GetSpacing(), dtype=np.float64))
    affine_lps[:3, 3] = np.asarray(image.GetOrigin(), dtype=np.float64)
    return LPS_TO_RAS @ affine_lps


# --------------------------------------------------------------------------- DICOM


def _require_folder(folder: Path) -> None:
    if not folder.exists():
        raise InputDataError(folder, "folder not found")
    if not folder.is_dir():
        raise InputDataError(folder, "is not a folder (a DICOM series is read from its folder)")


def _has_dicom_magic(path: Path) -> bool:
    try:
        with path.open("rb") as fp:
            fp.seek(128)
            return fp.read(4) == b"DICM"
    except OSError:
        return False


def _short_reason(error: BaseException, path: Path | None = None) -> str:
    text = " ".join(str(error).split())
    if path is not None:  # the message already starts with the path
        text = text.replace(f'"{path}"', "it").replace(f"'{path}'", "it").replace(str(path), "it")
    if not text:
        text = type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _is_image_sop_class(dataset: pydicom.Dataset) -> bool:
    meta = getattr(dataset, "file_meta", None)
    sop_class = None if meta is None else meta.get("MediaStorageSOPClassUID")
    if sop_class is None:
        sop_class = dataset.get("SOPClassUID")
    if sop_class is None:
        return "Rows" in dataset
    return "Image Storage" in str(getattr(sop_class, "name", ""))


def _pixel_bytes_needed(dataset: pydicom.Dataset) -> int:
    bits = int(dataset.get("BitsAllocated", 16) or 16)
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    return math.ceil(int(dataset.Rows) * int(dataset.Columns) * samples * frames * bits / 8)


def _read_slice_header(path: Path) -> _SliceHeader | None:
    """Read one file's header; None when it is not a DICOM image (ignored)."""
    expected_dicom = _has_dicom_magic(path) or path.name.lower().endswith(_DICOM_SUFFIXES)
    try:
        with path.open("rb") as fp:
            dataset = pydicom.dcmread(fp, stop_before_pixels=True)
            pixel_offset = fp.tell()
    except InvalidDicomError:
        if expected_dicom:
            size = path.stat().st_size
            raise InputDataError(
                path,
                f"is truncated or not a DICOM file: no valid DICOM header found ({size} bytes)",
            ) from None
        return None
    except Exception as error:  # pydicom raises many types on cut or corrupt files
        if expected_dicom:
            raise InputDataError(
                path, f"is truncated or corrupt: its DICOM header cannot be read ({_short_reason(error)})"
            ) from None
        return None

    series_uid = str(dataset.get("SeriesInstanceUID", "") or "")
    is_image = _is_image_sop_class(dataset)
    if not series_uid or (not is_image and "Rows" not in dataset):
        return None  # DICOMDIR, structured report, RT structure set, ...
    header = _SliceHeader(
        path=path,
        series_uid=series_uid,
        description=str(dataset.get("SeriesDescription", "") or "").strip(),
        modality=str(dataset.get("Modality", "") or "").strip(),
    )
    missing = [
        tag
        for tag in ("Rows", "Columns", "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing")
        if dataset.get(tag) in (None, "")
    ]
    if missing:
        header.problem = (
            f"lacks {', '.join(missing)}: the file is truncated or is not a slice that can be placed in "
            "space (cannot build a 3D volume)"
        )
        return header
    try:
        header.rows = int(dataset.Rows)
        header.columns = int(dataset.Columns)
        header.orientation = np.asarray([float(v) for v in dataset.ImageOrientationPatient], dtype=np.float64)
        header.position = np.asarray([float(v) for v in dataset.ImagePositionPatient], dtype=np.float64)
        header.pixel_spacing = np.asarray([float(v) for v in dataset.PixelSpacing], dtype=np.float64)
        header.frames = int(dataset.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as error:
        header.problem = f"has an unreadable geometry attribute ({_short_reason(error)})"
        return header
    if header.orientation.shape != (6,) or header.position.shape != (3,) or header.pixel_spacing.shape != (2,):
        header.problem = "has malformed ImageOrientationPatient, ImagePositionPatient or PixelSpacing"
        return header
    if not (
        np.all(np.isfinite(header.orientation))
        and np.all(np.isfinite(header.position))
        and np.all(np.isfinite(header.pixel_spacing))
        and np.all(header.pixel_spacing > 0)
    ):
        header.problem = "has non-finite or non-positive geometry values (orientation, position or pixel spacing)"
        return header
    header.rescale = (str(dataset.get("RescaleSlope", "")), str(dataset.get("RescaleIntercept", "")))

    transfer_syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    compressed = bool(getattr(transfer_syntax, "is_compressed", False))
    if not compressed:
        # stop_before_pixels leaves the file at the start of the PixelData element; its
        # element header takes at least 8 bytes, its value the bytes computed below.
        available = path.stat().st_size - pixel_offset - 8
        needed = _pixel_bytes_needed(dataset)
        if available < needed:
            header.problem = (
                f"is truncated: its pixel data needs {needed} bytes but the file holds only "
                f"{max(available, 0)} (an incomplete copy or download?)"
            )
    return header


def _scan_folder(folder: Path) -> dict[str, list[_SliceHeader]]:
    """Group the DICOM image files directly inside ``folder`` by series UID."""
    series: dict[str, list[_SliceHeader]] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        header = _read_slice_header(path)
        if header is not None:
            series.setdefault(header.series_uid, []).append(header)
    return series


def _series_info(headers: list[_SliceHeader]) -> SeriesInfo:
    first = headers[0]
    return SeriesInfo(
        uid=first.series_uid, description=first.description, modality=first.modality, num_files=len(headers)
    )


def _no_series_error(folder: Path) -> InputDataError:
    count = sum(1 for p in folder.iterdir() if p.is_file())
    if count == 0:
        return InputDataError(folder, "no DICOM series found (the folder has no files)")
    return InputDataError(folder, f"no DICOM series found ({count} file(s), none of them a DICOM image)")


def list_dicom_series(folder: str | Path) -> list[SeriesInfo]:
    """List the DICOM image series stored directly in a folder (not in sub-folders).

    Headers are read with pydicom (``stop_before_pixels=True``); only the series UID,
    description, modality and file count are kept, never patient fields. Files that
    are not DICOM (no ``DICM`` marker and no ``.dcm``-like ending) and DICOM objects
    without pixels (DICOMDIR, reports) are ignored.

    Args:
        folder: folder holding one file per slice.

    Returns:
        One entry per series, in the order their first file name sorts; empty when the
        folder holds no DICOM image.

    Raises:
        InputDataError: folder missing or not a folder, or a DICOM-looking file whose
            header cannot be parsed.
    """
    folder = Path(folder)
    _require_folder(folder)
    return [_series_info(headers) for headers in _scan_folder(folder).values()]


def _select_series(folder: Path, series: dict[str, list[_SliceHeader]], series_uid: str | None) -> list[_SliceHeader]:
    if not series:
        raise _no_series_error(folder)
    found = "; ".join(_series_info(headers).describe() for headers in series.values())
    if series_uid is None:
        if len(series) > 1:
            raise InputDataError(
                folder,
                f"holds {len(series)} DICOM series: {found}. Choose one by passing --series-uid UID",
            )
        return next(iter(series.values()))
    if series_uid not in series:
        raise InputDataError(folder, f"has no DICOM series with UID {series_uid}; series found: {found}")
    return series[series_uid]


def _fmt_point(point: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.2f}" for v in point) + ")"


def _check_and_sort_slices(folder: Path, headers: list[_SliceHeader]) -> tuple[list[_SliceHeader], float]:
    """Validate the geometry of one series; return slices sorted along the normal and spacing."""
    for header in headers:
        if header.problem is not None:
            raise InputDataError(header.path, header.problem)
    if len(headers) == 1:
        only = headers[0]
        if only.frames > 1:
            raise InputDataError(
                only.path,
                f"is a multi-frame DICOM file ({only.frames} frames); multi-frame (enhanced) DICOM is not "
                "supported, export the series as one file per slice or convert it to NIfTI",
            )
        raise InputDataError(
            folder,
            f"the DICOM series has a single slice ({only.path.name}); a 3D series of at least 2 slices is needed",
        )
    multi = [h for h in headers if h.frames > 1]
    if multi:
        raise InputDataError(multi[0].path, "is a multi-frame DICOM file; multi-frame DICOM is not supported")

    reference = headers[0]
    assert reference.orientation is not None and reference.pixel_spacing is not None
    for header in headers[1:]:
        assert header.orientation is not None and header.pixel_spacing is not None
        if (header.rows, header.columns) != (reference.rows, reference.columns):
            raise InputDataError(
                folder,
                f"slices of different sizes in one series: {reference.path.name} is "
                f"{reference.columns}x{reference.rows}, {header.path.name} is {header.columns}x{header.rows}",
            )
        if np.max(np.abs(header.orientation - reference.orientation)) > _ORIENTATION_TOL:
            raise InputDataError(
                folder,
                f"slices with different orientations in one series ({reference.path.name} and "
                f"{header.path.name}); cannot build one 3D volume",
            )
        if np.max(np.abs(header.pixel_spacing - reference.pixel_spacing)) > 1e-4 * np.max(reference.pixel_spacing):
            raise InputDataError(
                folder, f"slices with different pixel spacings ({reference.path.name} and {header.path.name})"
            )

    row, col = reference.orientation[:3], reference.orientation[3:]
    if (
        abs(np.linalg.norm(row) - 1) > 1e-3
        or abs(np.linalg.norm(col) - 1) > 1e-3
        or abs(float(np.dot(row, col))) > 1e-3
    ):
        raise InputDataError(
            reference.path, "has an invalid ImageOrientationPatient (direction cosines not orthonormal)"
        )
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)

    distances = np.asarray([float(np.dot(h.position, normal)) for h in headers])  # type: ignore[arg-type]
    order = np.argsort(distances, kind="stable")
    ordered = [headers[i] for i in order]
    distances = distances[order]
    gaps = np.diff(distances)

    for k, gap in enumerate(gaps):
        if gap <= _DUPLICATE_TOL_MM:
            raise InputDataError(
                folder,
                f"duplicate slice position: {ordered[k].path.name} and {ordered[k + 1].path.name} are both at "
                f"{distances[k]:.3f} mm along the slice normal (duplicated files, or two acquisitions mixed "
                "in one series)",
            )

    spacing = float(np.median(gaps))
    tolerance = max(_SPACING_REL_TOL * spacing, _SPACING_ABS_TOL_MM)
    for k, gap in enumerate(gaps):
        if abs(gap - spacing) <= tolerance:
            continue
        before, after = ordered[k], ordered[k + 1]
        multiple = round(gap / spacing)
        if multiple >= 2 and abs(gap - multiple * spacing) <= multiple * tolerance:
            assert before.position is not None
            missing = [before.position + normal * spacing * m for m in range(1, multiple)]
            where = ", ".join(_fmt_point(p) for p in missing)
            raise InputDataError(
                folder,
                f"{multiple - 1} missing slice(s): no slice at LPS position {where} mm "
                f"(from {distances[k] + spacing:.2f} mm along the slice normal), between {before.path.name} and "
                f"{after.path.name}, which are {gap:.3f} mm apart while the slice spacing is {spacing:.3f} mm",
            )
        raise InputDataError(
            folder,
            f"non-uniform slice spacing: {before.path.name} and {after.path.name} are {gap:.4f} mm apart "
            f"while the typical spacing is {spacing:.4f} mm (tolerance {tolerance:.4f} mm); resample the "
            "series to a regular grid first",
        )

    shear_tolerance = max(_SHEAR_ABS_TOL_MM, _SHEAR_REL_TOL * float(np.min(reference.pixel_spacing)))
    first = ordered[0]
    assert first.position is not None
    for header, distance in zip(ordered[1:], distances[1:], strict=True):
        assert header.position is not None
        shift = header.position - first.position - (distance - distances[0]) * normal
        if np.linalg.norm(shift) > shear_tolerance:
            raise InputDataError(
                folder,
                f"slices are not stacked along the slice normal: {header.path.name} is shifted in-plane by "
                f"{np.linalg.norm(shift):.3f} mm relative to {first.path.name} (gantry tilt?); resample the "
                "series to a regular grid first",
            )
    return ordered, spacing


def _find_unreadable_file(paths: list[Path]) -> tuple[Path, str] | None:
    for path in paths:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as error:
            return path, _itk_reason(error)
        size = image.GetSize()
        if len(size) < 2 or 0 in size:
            return path, "holds no pixels"
    return None


def _itk_reason(error: BaseException) -> str:
    text = str(error)
    if "ITK ERROR" in text:
        text = text.split("ITK ERROR", 1)[1].split(":", 1)[-1]
    return _short_reason(error if not text.strip() else RuntimeError(text))


def _read_series(folder: Path, series_uid: str | None) -> tuple[sitk.Image, SeriesInfo]:
    _require_folder(folder)
    headers = _select_series(folder, _scan_folder(folder), series_uid)
    info = _series_info(headers)
    ordered, spacing = _check_and_sort_slices(folder, headers)
    paths = [h.path for h in ordered]

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in paths])
    if len({h.rescale for h in ordered}) > 1:
        # RescaleSlope/Intercept vary between slices: read as float so that no slice's
        # rescaled values get truncated to the first slice's integer type.
        reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        culprit = _find_unreadable_file(paths)
        if culprit is not None:
            raise InputDataError(culprit[0], f"pixel data cannot be read ({culprit[1]})") from None
        raise InputDataError(folder, f"the series' pixel data cannot be read ({_itk_reason(error)})") from None

    size = image.GetSize()
    if image.GetDimension() != 3 or size[2] != len(paths) or size[:2] != (ordered[0].columns, ordered[0].rows):
        culprit = _find_unreadable_file(paths)
        where: Path = culprit[0] if culprit is not None else folder
        raise InputDataError(
            where,
            f"unreadable or truncated slice: read a {'x'.join(map(str, size))} volume from a series of "
            f"{len(paths)} files of {ordered[0].columns}x{ordered[0].rows} pixels",
        )
    for key in image.GetMetaDataKeys():  # keep nothing from the headers on the image
        image.EraseMetaData(key)

    # Verify SimpleITK's geometry against the headers checked above.
    first = ordered[0]
    assert first.position is not None and first.orientation is not None and first.pixel_spacing is not None
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    expected_direction = np.column_stack(
        [first.orientation[:3], first.orientation[3:], np.cross(first.orientation[:3], first.orientation[3:])]
    )
    expected_spacing = np.asarray([first.pixel_spacing[1], first.pixel_spacing[0], spacing])
    if (
        np.max(np.abs(np.asarray(image.GetOrigin()) - first.position)) > 1e-3
        or np.max(np.abs(direction - expected_direction)) > 1e-3
        or np.max(np.abs(np.asarray(image.GetSpacing()) - expected_spacing)) > _SPACING_REL_TOL * spacing
    ):
        raise InputDataError(folder, "the geometry SimpleITK read disagrees with the slice headers")
    return image, info


def read_dicom_series(folder: str | Path, series_uid: str | None = None) -> sitk.Image:
    """Read one DICOM series from a folder as a validated 3D SimpleITK image.

    Slices are ordered by position along the slice normal (never by file name) and
    checked: all slices must share size, orientation and pixel spacing, and be evenly
    spaced with no missing, duplicate or in-plane shifted slice. Pixel values come out
    rescaled (RescaleSlope/Intercept applied, i.e. Hounsfield units for CT). A
    single-slice series and multi-frame files are refused. The returned image carries
    no header metadata (no patient fields).

    Args:
        folder: folder holding the series, one file per slice.
        series_uid: SeriesInstanceUID to read; required when the folder holds several
            series.

    Returns:
        The 3D image in SimpleITK's LPS geometry, x = column index, y = row index,
        z = slice index in increasing position along the normal.

    Raises:
        InputDataError: no series, ambiguous or unknown ``series_uid``, unreadable or
            truncated file, inconsistent or irregular slice geometry.
    """
    image, _ = _read_series(Path(folder), series_uid)
    return image


# --------------------------------------------------------------------------- NIfTI


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
        raise InputDataError(path, f"cannot be read as a NIfTI image ({_short_reason(error, path)})") from None
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise InputDataError(path, f"is not a NIfTI image (nibabel reads it as {type(image).__name__})")
    try:
        data = np.asanyarray(image.dataobj)
    except (EOFError, OSError, ValueError, zlib.error, MemoryError) as error:
        raise InputDataError(
            path, f"is truncated or corrupt: its voxel data cannot be read ({_short_reason(error, path)})"
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
