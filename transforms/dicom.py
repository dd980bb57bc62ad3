"""DICOM series reading: folder scanning, header checks, series selection and slice geometry.

Every problem surfaces as :class:`~transforms.errors.InputDataError` naming the file or
folder at fault and the problem in plain words, never as a raw SimpleITK / pydicom
traceback.

Conventions:

* Images come out as SimpleITK images in LPS geometry (x = DICOM column index, y = row
  index, z = slice index); :func:`affine_from_sitk` gives the RAS world affine
  (``affine_ras = diag(-1, -1, 1, 1) @ affine_lps`` with
  ``affine_lps[:3, :3] = direction @ diag(spacing)`` and ``affine_lps[:3, 3] = origin``).
* Every file directly inside a series folder is accounted for: it is a slice of a
  series; clearly not DICOM (no ``DICM`` marker at byte 128 and no ``.dcm`` /
  ``.dicom`` / ``.ima`` ending), and ignored; a well-formed DICOM object whose SOP
  Class UID is not an image storage class (DICOMDIR, structured report, RT structure
  set, SEG, presentation state...), and ignored; or an error naming it. A DICOM-looking
  file that does not parse cleanly, an image without a valid SOP Class UID or
  SeriesInstanceUID, garbage read as data elements, a cut header or cut pixel data are
  errors: a series never silently loses a slice. Sub-folders are not read.
* DICOM slices are ordered by their position along the slice normal
  (``dot(ImagePositionPatient, cross(row, col))``), never by file name, and the slice
  positions are checked here (missing, duplicate, unevenly spaced or sheared slices are
  errors; SimpleITK would only print a warning). Only 3D series are accepted: a
  single-slice series and multi-frame (enhanced) DICOM files are refused.
* No patient-identifying DICOM attribute (PatientName, PatientID, PatientBirthDate,
  AccessionNumber, InstitutionName, ...) is stored, returned, logged or put in a message:
  only UIDs, the series description, modality and geometry are read from headers, and
  messages name data elements by tag, never by value.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pydicom.valuerep import VR

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

# Files with these endings are expected to be DICOM: failing to parse one is an error
# rather than a silently ignored stray file.
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
# A DICOM Part 10 file: 128-byte preamble, then this marker.
_MAGIC_OFFSET = 128
_MAGIC = b"DICM"
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

# Header validation. UIDs: digits and dots, at most 64 characters (leading zeros in a
# component, which some scanners write, are tolerated).
_UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")
_UID_MAX_LENGTH = 64
_KNOWN_VRS = frozenset(str(vr.value) for vr in VR if len(str(vr.value)) == 2)
# Explicit VR data elements whose length takes 4 bytes after 2 reserved ones (PS3.5 7.1.2).
_LONG_LENGTH_VRS = (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
_UNDEFINED_LENGTH = 0xFFFFFFFF
_PIXEL_DATA_TAG = (0x7FE0, 0x0010)
_TAG_SOP_CLASS = 0x00080016
_TAG_MEDIA_SOP_CLASS = 0x00020002
_TAG_TRANSFER_SYNTAX = 0x00020010
_TAG_SERIES_UID = 0x0020000E


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
class _SliceHeader:
    """What is needed from one DICOM image file's header (never patient fields)."""

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


@dataclass(frozen=True)
class _NonImageObject:
    """A well-formed DICOM object that is not an image (DICOMDIR, report, SEG, ...): ignored."""

    path: Path
    sop_class_name: str
    series_uid: str | None
    has_rows: bool  # carries an image-like Rows attribute (SEG, RT Dose, or a slice with a wrong SOP class)


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


# --------------------------------------------------------------------------- one file


def _require_folder(folder: Path) -> None:
    if not folder.exists():
        raise InputDataError(folder, "folder not found")
    if not folder.is_dir():
        raise InputDataError(folder, "is not a folder (a DICOM series is read from its folder)")


def _read_head(path: Path) -> bytes:
    """The first 132 bytes of a file (preamble and DICOM marker); an unreadable file is an error."""
    try:
        with path.open("rb") as fp:
            return fp.read(_MAGIC_OFFSET + len(_MAGIC))
    except OSError as error:
        raise InputDataError(path, f"cannot be read ({error.strerror or short_reason(error)})") from None


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _looks_like_raw_dataset(path: Path, head: bytes) -> bool:
    """Whether a file without the DICOM marker is nevertheless a DICOM data set (no preamble)."""
    if len(head) < 8:
        return False
    group, element = struct.unpack("<HH", head[:4])
    if group not in (0x0002, 0x0008) or element > 0x0018:
        return False
    explicit = head[4:6].decode("latin-1") in _KNOWN_VRS
    if not explicit and struct.unpack("<I", head[4:8])[0] > 1024:
        return False
    try:
        dataset = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    except Exception:  # not parseable as DICOM either: a stray file
        return False
    return any(tag in dataset or tag in dataset.file_meta for tag in (_TAG_SOP_CLASS, _TAG_MEDIA_SOP_CLASS))


def _not_part10_problem(path: Path, head: bytes) -> str | None:
    """Why a file without the ``DICM`` marker must be refused; None when it is clearly not DICOM."""
    if _looks_like_raw_dataset(path, head):
        return (
            "is a DICOM data set without the DICOM file header (no 'DICM' marker at byte 128); such files are "
            "not supported: export the series again as standard DICOM files"
        )
    if path.name.lower().endswith(_DICOM_SUFFIXES):
        size = path.stat().st_size
        if size == 0:
            return "is empty (0 bytes) although its name says DICOM (an incomplete copy or download?)"
        return (
            f"is truncated or not a DICOM file: no DICOM header ('DICM' marker at byte 128) found ({size} bytes) "
            "although its name says DICOM"
        )
    return None


def _check_elements(path: Path, dataset: pydicom.Dataset, explicit_vr: bool, what: str) -> None:
    """Refuse data elements that pydicom read leniently: cut short, or garbage with an invalid VR."""
    for tag in list(dataset.keys()):
        element = dataset.get_item(tag)
        if not isinstance(element, RawDataElement):
            continue
        if explicit_vr and (element.VR is None or element.VR not in _KNOWN_VRS):
            vr = "none" if element.VR is None else repr(element.VR)
            raise InputDataError(
                path,
                f"is corrupt: {what} data element {_tag(tag)} has an invalid value representation ({vr}); "
                "garbage where the DICOM header should be",
            )
        if (
            element.length != _UNDEFINED_LENGTH
            and isinstance(element.value, bytes)
            and len(element.value) != element.length
        ):
            raise InputDataError(
                path,
                f"is truncated: {what} data element {_tag(tag)} should hold {element.length} bytes but the file "
                f"ends after {len(element.value)} (an incomplete copy or download?)",
            )


def _uid(path: Path, dataset: pydicom.Dataset, tag: int, keyword: str) -> str | None:
    """A UID attribute read from its raw bytes and validated; None when absent or empty."""
    if tag not in dataset:
        return None
    value = dataset.get_item(tag).value
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            text = value.decode("ascii")
        except UnicodeDecodeError:
            text = "\\invalid"  # cannot be a UID
    else:
        text = str(value)
    text = text.rstrip("\x00 ").strip()
    if not text:
        return None
    if len(text) > _UID_MAX_LENGTH or not _UID_PATTERN.fullmatch(text):
        raise InputDataError(path, f"has an invalid {keyword} {_tag(tag)}: the value is not a DICOM UID (corrupt header?)")
    return text


def _identify(path: Path, dataset: pydicom.Dataset) -> tuple[bool, str]:
    """Tell from the SOP Class UID whether a parsed DICOM object is an image; return (is_image, class name)."""
    meta_class = _uid(path, dataset.file_meta, _TAG_MEDIA_SOP_CLASS, "MediaStorageSOPClassUID")
    sop_class = _uid(path, dataset, _TAG_SOP_CLASS, "SOPClassUID")
    if meta_class is None and sop_class is None:
        raise InputDataError(
            path,
            "lacks a SOP Class UID (neither SOPClassUID (0008,0016) nor MediaStorageSOPClassUID (0002,0002)), so "
            "what kind of DICOM object it is cannot be told (corrupt or truncated header?)",
        )
    if meta_class is not None and sop_class is not None and meta_class != sop_class:
        raise InputDataError(
            path,
            "is inconsistent: its SOPClassUID (0008,0016) differs from the MediaStorageSOPClassUID (0002,0002) "
            "of its file meta information (corrupt header?)",
        )
    uid = UID(sop_class or meta_class)
    if not uid.type:  # a private or unknown SOP class: an image when it has image rows
        is_image, name = "Rows" in dataset, f"private SOP class {uid}"
    elif uid.type != "SOP Class":
        raise InputDataError(
            path, f"has a SOP Class UID that is not a SOP class but a {uid.type} ({uid.name}): corrupt header?"
        )
    else:
        is_image, name = "Image Storage" in uid.name, uid.name
    if is_image:
        if sop_class is None:
            raise InputDataError(
                path, f"lacks SOPClassUID (0008,0016), which every DICOM image needs (its file meta says {name})"
            )
        if meta_class is None:
            raise InputDataError(
                path, f"lacks MediaStorageSOPClassUID (0002,0002) in its file meta information ({name}; corrupt header?)"
            )
    return is_image, name


def _pixel_bytes_needed(dataset: pydicom.Dataset) -> int:
    bits = int(dataset.get("BitsAllocated", 16) or 16)
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if bits <= 0 or samples <= 0 or frames <= 0:
        raise ValueError("BitsAllocated, SamplesPerPixel and NumberOfFrames must be positive")
    return math.ceil(int(dataset.Rows) * int(dataset.Columns) * samples * frames * bits / 8)


def _pixel_data_problem(path: Path, dataset: pydicom.Dataset, pixel_offset: int) -> str | None:
    """Check the PixelData element that must follow the header at ``pixel_offset``; None when it is complete."""
    transfer_syntax = UID(_uid(path, dataset.file_meta, _TAG_TRANSFER_SYNTAX, "TransferSyntaxUID") or "")
    if not transfer_syntax.is_transfer_syntax:
        return "has a missing or unknown TransferSyntaxUID (0002,0010): its pixel data cannot be decoded"
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        return None  # pydicom inflated the data set: offsets do not refer to the file; SimpleITK checks it
    implicit_vr, little_endian = dataset.original_encoding
    size = path.stat().st_size
    with path.open("rb") as fp:
        fp.seek(pixel_offset)
        head = fp.read(12)
    if len(head) < 8:
        return (
            "has no pixel data: no PixelData element (7FE0,0010) follows its header (the pixel data was removed, or "
            "the file was cut before it)"
        )
    endian = "<" if little_endian else ">"
    group, element = struct.unpack(f"{endian}HH", head[:4])
    if (group, element) != _PIXEL_DATA_TAG:
        return (
            f"has no pixel data: its header is followed by data element ({group:04X},{element:04X}) instead of "
            "PixelData (7FE0,0010) (float pixel data is not supported; otherwise a corrupt file)"
        )
    if implicit_vr:
        header_length, length = 8, struct.unpack(f"{endian}I", head[4:8])[0]
    elif head[4:6] in _LONG_LENGTH_VRS:
        if len(head) < 12:
            return "is truncated: the file ends inside its PixelData element header"
        header_length, length = 12, struct.unpack(f"{endian}I", head[8:12])[0]
    else:
        header_length, length = 8, struct.unpack(f"{endian}H", head[6:8])[0]
    if transfer_syntax.is_compressed:
        return None  # encapsulated fragments: SimpleITK decodes and checks them
    needed = _pixel_bytes_needed(dataset)
    available = size - pixel_offset - header_length
    if length == _UNDEFINED_LENGTH or length < needed:
        declared = "an undefined length" if length == _UNDEFINED_LENGTH else f"{length} bytes"
        return (
            f"is corrupt: its PixelData element declares {declared} but {dataset.Columns}x{dataset.Rows} pixels "
            f"need {needed} bytes"
        )
    if available < needed:
        return (
            f"is truncated: its pixel data needs {needed} bytes but the file holds only "
            f"{max(available, 0)} (an incomplete copy or download?)"
        )
    return None


def _slice_header(path: Path, dataset: pydicom.Dataset, pixel_offset: int) -> _SliceHeader:
    """Build the header of an image file; per-slice problems are recorded, raised if its series is read."""
    series_uid = _uid(path, dataset, _TAG_SERIES_UID, "SeriesInstanceUID")
    if series_uid is None:
        raise InputDataError(
            path, "is a DICOM image without a SeriesInstanceUID (0020,000E): it belongs to no series (corrupt header?)"
        )
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
        header.problem = f"has an unreadable geometry attribute ({short_reason(error)})"
        return header
    if header.rows <= 0 or header.columns <= 0 or header.frames <= 0:
        header.problem = "has a zero or negative Rows, Columns or NumberOfFrames"
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
    header.problem = _pixel_data_problem(path, dataset, pixel_offset)
    return header


def _read_entry(path: Path) -> _SliceHeader | _NonImageObject | None:
    """Classify one folder entry: a slice, an ignored non-image DICOM object, or None (not DICOM).

    Raises:
        InputDataError: the entry is DICOM (or looks like it) but cannot be used safely.
    """
    if path.is_symlink() and not path.exists():
        raise InputDataError(path, "is a broken symbolic link (its target does not exist)")
    if not path.is_file():
        raise InputDataError(path, "is not a regular file (a series folder should hold only files)")
    head = _read_head(path)
    if head[_MAGIC_OFFSET:] != _MAGIC:
        problem = _not_part10_problem(path, head)
        if problem is not None:
            raise InputDataError(path, problem)
        return None  # clearly not DICOM: notes, thumbnails, .DS_Store, ...
    size = path.stat().st_size
    if size <= len(head):
        raise InputDataError(path, f"is truncated: nothing follows its DICOM marker ('DICM' at byte 128; {size} bytes)")
    try:
        with path.open("rb") as fp:
            dataset = pydicom.dcmread(fp, stop_before_pixels=True)
            pixel_offset = fp.tell()
        if len(dataset.file_meta) == 0:
            raise InputDataError(
                path,
                "is corrupt: no DICOM file meta information (group 0002) follows its 'DICM' marker; the rest of "
                "the file is not a DICOM header",
            )
        explicit_vr = dataset.original_encoding[0] is False
        _check_elements(path, dataset.file_meta, True, "file meta")
        _check_elements(path, dataset, explicit_vr, "header")
        is_image, name = _identify(path, dataset)
        if is_image:
            return _slice_header(path, dataset, pixel_offset)
        series_uid = _uid(path, dataset, _TAG_SERIES_UID, "SeriesInstanceUID")
        return _NonImageObject(path=path, sop_class_name=name, series_uid=series_uid, has_rows="Rows" in dataset)
    except InputDataError:
        raise
    except InvalidDicomError as error:
        raise InputDataError(path, f"is corrupt: its DICOM header is invalid ({short_reason(error, path)})") from None
    except Exception as error:  # pydicom raises many types on cut or corrupt files
        raise InputDataError(
            path, f"is truncated or corrupt: its DICOM header cannot be read ({short_reason(error, path)})"
        ) from None


# --------------------------------------------------------------------------- series


def _scan_folder(folder: Path) -> dict[str, list[_SliceHeader]]:
    """Group the DICOM image files directly inside ``folder`` by series UID (sub-folders are not read)."""
    series: dict[str, list[_SliceHeader]] = {}
    others: list[_NonImageObject] = []
    for path in sorted(folder.iterdir()):
        if path.is_dir():
            continue
        entry = _read_entry(path)
        if isinstance(entry, _SliceHeader):
            series.setdefault(entry.series_uid, []).append(entry)
        elif entry is not None:
            others.append(entry)
    for other in others:
        if other.has_rows and other.series_uid in series:
            raise InputDataError(
                other.path,
                f"carries image rows and the SeriesInstanceUID of the image series {other.series_uid} but its SOP "
                f"class ({other.sop_class_name}) is not an image storage class: a slice with a corrupt SOP Class UID?",
            )
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
            looks like it) but cannot be parsed cleanly or identified (see the module
            docstring).
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
    return short_reason(error if not text.strip() else RuntimeError(text))


def _validated_slices(folder: Path, series_uid: str | None) -> tuple[list[_SliceHeader], float, SeriesInfo]:
    """Scan the folder, select the series and validate it; slices sorted along the normal, spacing, info."""
    _require_folder(folder)
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
