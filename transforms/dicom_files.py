"""The files of a DICOM series folder: which one is a slice, which is ignored, which is an error.

:func:`_scan_folder` reads the header of every file directly inside a folder and groups
the image files by series. Every problem surfaces as
:class:`~transforms.errors.InputDataError` naming the file or folder at fault and the
problem in plain words, never as a raw pydicom traceback.

Every file directly inside a series folder is accounted for: it is a slice of a
series; clearly not DICOM (no ``DICM`` marker at byte 128 and no ``.dcm`` / ``.dicom``
/ ``.ima`` ending), and ignored; a well-formed DICOM object whose SOP Class UID is not
an image storage class (DICOMDIR, structured report, RT structure set, SEG,
presentation state...), and ignored; or an error naming it. A DICOM-looking file that
does not parse cleanly, an image without a valid SOP Class UID or SeriesInstanceUID,
garbage read as data elements, a cut header or cut pixel data are errors: a series
never silently loses a slice. Sub-folders are not read.

A slice's own defects that do not keep its series from being identified (missing or
malformed geometry attributes, cut pixel data) are recorded on its header and raised
only when that series is read (:mod:`transforms.dicom_geometry`): they do not stop the
listing of the folder's series or the reading of another series in it.

Only UIDs, the series description, modality and geometry are read from headers, and
messages name data elements by tag, never by value (no patient-identifying attribute:
see :mod:`transforms.dicom`).
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pydicom.valuerep import VR

from transforms.errors import InputDataError, short_reason

# Files with these endings are expected to be DICOM: failing to parse one is an error
# rather than a silently ignored stray file.
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
# A DICOM Part 10 file: 128-byte preamble, then this marker.
_MAGIC_OFFSET = 128
_MAGIC = b"DICM"

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


# --------------------------------------------------------------------------- one file


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


# --------------------------------------------------------------------------- the folder


def _require_folder(folder: Path) -> None:
    if not folder.exists():
        raise InputDataError(folder, "folder not found")
    if not folder.is_dir():
        raise InputDataError(folder, "is not a folder (a DICOM series is read from its folder)")


def _scan_folder(folder: Path) -> dict[str, list[_SliceHeader]]:
    """Group the DICOM image files directly inside ``folder`` by series UID (sub-folders are not read).

    Raises:
        InputDataError: the folder is missing or not a folder, or one of its files must be refused.
    """
    _require_folder(folder)
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

