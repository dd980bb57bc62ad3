"""Slice geometry of a DICOM series: the checks that its slices make one regular 3D grid, and their order.

DICOM slices are ordered by their position along the slice normal
(``dot(ImagePositionPatient, cross(row, col))``), never by file name. All slices must
share size, orientation and pixel spacing, and the slice positions are checked here
(missing, duplicate, unevenly spaced or sheared slices are errors; SimpleITK would only
print a warning). Only 3D series are accepted: a
single-slice series and multi-frame (enhanced) DICOM files are refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from transforms.dicom_files import _SliceHeader
from transforms.errors import InputDataError

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


def _check_and_sort_slices(folder: Path, headers: list[_SliceHeader]) -> tuple[list[_SliceHeader], float]:
    """Validate the geometry of one series; return slices sorted along the normal and spacing."""
    _check_usable_slices(folder, headers)
    _check_same_grid(folder, headers)
    reference = headers[0]
    normal = _slice_normal(reference)
    ordered, distances = _sort_along_normal(headers, normal)
    _check_no_duplicate(folder, ordered, distances)
    spacing = _regular_spacing(folder, ordered, distances, normal)
    _check_no_shear(folder, ordered, distances, normal, reference)
    return ordered, spacing


def _check_usable_slices(folder: Path, headers: list[_SliceHeader]) -> None:
    """Raise the problem a slice's header recorded; refuse a single-slice series and multi-frame files."""
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


def _check_same_grid(folder: Path, headers: list[_SliceHeader]) -> None:
    """Every slice must have the first one's size, orientation and pixel spacing."""
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


def _slice_normal(reference: _SliceHeader) -> np.ndarray:
    """The unit slice normal ``cross(row, col)`` of a slice whose direction cosines must be orthonormal."""
    assert reference.orientation is not None
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
    return normal


def _sort_along_normal(headers: list[_SliceHeader], normal: np.ndarray) -> tuple[list[_SliceHeader], np.ndarray]:
    """The slices by increasing position along the normal (ties keep folder order), and those positions in mm."""
    distances = np.asarray([float(np.dot(h.position, normal)) for h in headers])  # type: ignore[arg-type]
    order = np.argsort(distances, kind="stable")
    return [headers[i] for i in order], distances[order]


def _check_no_duplicate(folder: Path, ordered: list[_SliceHeader], distances: np.ndarray) -> None:
    """No two sorted slices may sit at the same position along the normal."""
    for k, gap in enumerate(np.diff(distances)):
        if gap <= _DUPLICATE_TOL_MM:
            raise InputDataError(
                folder,
                f"duplicate slice position: {ordered[k].path.name} and {ordered[k + 1].path.name} are both at "
                f"{distances[k]:.3f} mm along the slice normal (duplicated files, or two acquisitions mixed "
                "in one series)",
            )


def _regular_spacing(folder: Path, ordered: list[_SliceHeader], distances: np.ndarray, normal: np.ndarray) -> float:
    """The slice spacing (the median gap), once every gap is checked to equal it.

    A gap that is a whole multiple of the spacing is reported as missing slices, with
    the positions where they should be; any other deviation as non-uniform spacing.
    """
    gaps = np.diff(distances)
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
    return spacing


def _fmt_point(point: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.2f}" for v in point) + ")"


def _check_no_shear(
    folder: Path, ordered: list[_SliceHeader], distances: np.ndarray, normal: np.ndarray, reference: _SliceHeader
) -> None:
    """Every sorted slice must lie straight along the normal from the first, not shifted in-plane.

    The tolerance is the larger of 0.01 mm and 1 % of ``reference``'s smallest pixel spacing.
    """
    assert reference.pixel_spacing is not None
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
