"""The DICOM files of a source: which file is which instance of which series (header fields only, no patient fields).

Headers are read once and remembered by path, size and modification time in an index file, so a second
scan of a large export reads no header it has read before.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from pipeline.data.files import write_text_atomic
from pipeline.errors import InputDataError

_TAGS = ["SOPClassUID", "SOPInstanceUID", "Modality", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
         "SeriesDescription"]


@dataclass
class Instance:
    """One DICOM file of the source (header fields only, no patient fields).

    Args:
        path: the file.
        sop_uid: SOPInstanceUID.
        modality: Modality.
        study_uid: StudyInstanceUID.
        series_uid: SeriesInstanceUID.
        frame_of_reference_uid: FrameOfReferenceUID ("" when absent).
        description: SeriesDescription ("" when absent; what finds a multi-channel task's other channels).
    """

    path: Path
    sop_uid: str
    modality: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    description: str = ""


def _read_instance(path: Path) -> dict[str, str] | None:
    try:
        # force: some tools write objects without the Part 10 preamble and file meta; they have the UIDs all the same.
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS, force=True)
    except Exception:  # not a DICOM file: a folder exported from a PACS holds DICOMDIRs, notes, thumbnails
        return None
    record = {k: str(ds.get(k, "") or "") for k in _TAGS}
    return record if record["SOPInstanceUID"] and record["SeriesInstanceUID"] else None


def index_files(files: list[Path], index_path: Path) -> list[Instance]:
    """The DICOM instances among ``files``; headers are read once and remembered by path, size and mtime.

    Args:
        files: candidate files.
        index_path: the JSON file remembering headers already read.
    """
    try:
        known = json.loads(index_path.read_text()) if index_path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        known = {}
    fresh: dict[str, Any] = {}
    instances = []
    for path in files:
        st = path.stat()
        key = f"2|{path}|{st.st_size}|{st.st_mtime_ns}"  # 2: records hold SeriesDescription
        record = known[key] if key in known else _read_instance(path)
        fresh[key] = record
        if record:
            instances.append(Instance(path, record["SOPInstanceUID"], record["Modality"], record["StudyInstanceUID"],
                                      record["SeriesInstanceUID"], record["FrameOfReferenceUID"],
                                      record.get("SeriesDescription", "")))
    if fresh != known:
        write_text_atomic(index_path, json.dumps(fresh))
    return instances


def folder_files(folder: Path) -> list[Path]:
    """Every regular file under ``folder``, at any depth, hidden folders left out.

    Args:
        folder: the DICOM folder.
    """
    if not folder.is_dir():
        raise InputDataError(folder, "DICOM dataset folder not found")
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / n for n in sorted(names) if not n.startswith("."))
    return found
