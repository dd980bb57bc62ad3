"""DICOM series reading: listing the series of a folder, selecting one, reading it as a 3D image.

Every problem surfaces as :class:`~transforms.errors.InputDataError` naming the file or
folder at fault and the problem in plain words, never as a raw SimpleITK / pydicom
traceback. The work is split by step:

* :mod:`transforms.dicom_files` scans a series folder: which file is a slice of which
  series, which is ignored (clearly not DICOM, or a DICOM object that is not an image)
  and which is an error.
* :mod:`transforms.dicom_geometry` checks that the slices of the selected series make
  one regular 3D grid (a single-slice series and multi-frame files are refused) and
  orders them along the slice normal, never by file name.
* This module selects the series, reads its pixels with SimpleITK and verifies the
  geometry SimpleITK read against the checked headers.

Conventions:

* Images come out as SimpleITK images in LPS geometry (x = DICOM column index, y = row
  index, z = slice index); :func:`affine_from_sitk` gives the RAS world affine
  (``affine_ras = diag(-1, -1, 1, 1) @ affine_lps`` with
  ``affine_lps[:3, :3] = direction @ diag(spacing)`` and ``affine_lps[:3, 3] = origin``).
* No patient-identifying DICOM attribute (PatientName, PatientID, PatientBirthDate,
  AccessionNumber, InstitutionName, ...) is stored, returned, logged or put in a message:
  only UIDs, the series description, modality and geometry are read from headers, and
  messages name data elements by tag, never by value.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from transforms.dicom_files import _scan_folder, _SliceHeader
from transforms.dicom_geometry import _SPACING_REL_TOL, _check_and_sort_slices
from transforms.errors import InputDataError, short_reason

__all__ = [
    "LPS_TO_RAS",
    "SeriesInfo",
    "affine_from_sitk",
    "list_dicom_series",
    "read_dicom_series",
    "series_files",
]

#: Converts an LPS affine (DICOM, SimpleITK) to RAS (nibabel, MONAI) and back.
LPS_TO_RAS: np.ndarray = np.diag([-1.0, -1.0, 1.0, 1.0])


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
    are not DICOM (no ``DICM`` marker and no ``.dcm``-like ending) and well-formed
    DICOM objects whose SOP class is not an image storage class (DICOMDIR, reports,
    SEG, ...) are ignored; every other file must be a valid DICOM image.

    Args:
        folder: folder holding one file per slice.

    Returns:
        One entry per series, in the order their first file name sorts; empty when the
        folder holds no DICOM image.

    Raises:
        InputDataError: folder missing or not a folder, or a file that is DICOM (or
            looks like it) but cannot be parsed cleanly or identified (see
            :mod:`transforms.dicom_files`).
    """
    return [_series_info(headers) for headers in _scan_folder(Path(folder)).values()]


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
    return short_reason(error if not text.strip() else RuntimeError(text))


def _validated_slices(folder: Path, series_uid: str | None) -> tuple[list[_SliceHeader], float, SeriesInfo]:
    """Scan the folder, select the series and validate it; slices sorted along the normal, spacing, info."""
    headers = _select_series(folder, _scan_folder(folder), series_uid)
    info = _series_info(headers)
    ordered, spacing = _check_and_sort_slices(folder, headers)
    return ordered, spacing, info


def series_files(folder: str | Path, series_uid: str | None = None) -> list[Path]:
    """The files of one DICOM series in volume slice order: file ``k`` is slice ``k``.

    The files are selected and validated exactly as :func:`read_dicom_series` does
    before it reads pixels (same series selection, header and slice geometry checks),
    and sorted as the third array axis (k, SimpleITK's z) of the volume it returns:
    by increasing position along the slice normal. Pixel data is not decoded. Meant
    for building objects that reference the source slices (e.g. a DICOM SEG whose
    frame k references source file k).

    Args:
        folder: folder holding the series, one file per slice.
        series_uid: SeriesInstanceUID to select; required when the folder holds several
            series.

    Returns:
        The paths of the series' files, slice 0 first.

    Raises:
        InputDataError: as :func:`read_dicom_series`, for every problem found in the
            headers.
    """
    ordered, _, _ = _validated_slices(Path(folder), series_uid)
    return [header.path for header in ordered]


def _read_series(folder: Path, series_uid: str | None) -> tuple[sitk.Image, SeriesInfo]:
    ordered, spacing, info = _validated_slices(folder, series_uid)
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
        InputDataError: no series, ambiguous or unknown ``series_uid``, a file in the
            folder that is DICOM (or looks like it) but is unreadable, truncated,
            corrupt or cannot be identified (the error names it), inconsistent or
            irregular slice geometry.
    """
    image, _ = _read_series(Path(folder), series_uid)
    return image
