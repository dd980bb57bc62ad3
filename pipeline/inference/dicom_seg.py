"""DICOM SEG (highdicom) of a predicted label map, referencing the source series it was predicted from.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import Staged, save_file
from pipeline.errors import InputDataError


def seg_series_description(name: str, version: str | int) -> str:
    """``unet-pipeline NAME vVERSION``: the SEG series description that marks one model version's results.

    Written into every SEG and compared exactly by a PACS watch pass, so both take it from here.

    Args:
        name: the model's name.
        version: the model's version.
    """
    return f"unet-pipeline {name} v{version}"


@dataclass(frozen=True)
class Algorithm:
    """Who made a segmentation, as DICOM SEG states it.

    Args:
        name: the model's name (registered model name).
        version: the model's version (registry version, run id or checkpoint).
        software_version: this package's version.
    """

    name: str
    version: str
    software_version: str

    @property
    def series_description(self) -> str:
        """The SEG series description, also how a PACS pass recognises its own results (64 characters max)."""
        return seg_series_description(self.name, self.version)[:64]


def write_dicom_seg(
    labels: np.ndarray, source_files: Sequence[Path], label_names: Mapping[int, str], algorithm: Algorithm, path: Path,
    staged: Staged | None = None,
) -> Path:
    """Write a DICOM SEG (highdicom, BINARY) of ``labels`` referencing its source series, atomically.

    Frame ``k`` of the label map (third array axis) is the slice of ``source_files[k]``;
    the SEG copies the sources' patient and study modules (it belongs in the same study)
    and references every source instance. Segment numbers run 1..N over the model's
    foreground labels in increasing value, named by the label names; the algorithm is
    identified by name and version.

    Args:
        labels: ``(columns, rows, slices)`` label map on the series' grid (the reader's (i, j, k) order).
        source_files: the series' files in the label map's slice order.
        label_names: foreground label value -> name (every segment is described, empty or not).
        algorithm: the model's identity.
        path: the target ``.dcm``.
        staged: write as part of these staged files (committed together); default: on its own.
    """
    import pydicom

    with _quiet_dicom_libraries():
        datasets = [pydicom.dcmread(str(f)) for f in source_files]
        try:
            return _write_dicom_seg(labels, datasets, label_names, algorithm, path, staged)
        except (ValueError, TypeError, AttributeError, KeyError) as error:
            # highdicom refuses sources it cannot reference (e.g. slices whose orientations differ in the last
            # digit). Its message may quote header values (patient data): only the kind of error is shown.
            raise InputDataError(Path(source_files[0]).parent, f"cannot be referenced by a DICOM SEG (highdicom "
                                                               f"raised {type(error).__name__})") from None


@contextmanager
def _quiet_dicom_libraries() -> Iterator[None]:
    """highdicom and pydicom warn about header values by quoting them (e.g. a PatientName that is not
    formatted as a person name): such text must never reach a console or a log."""
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("highdicom", "pydicom")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _write_dicom_seg(labels: np.ndarray, datasets: list[Any], label_names: Mapping[int, str], algorithm: Algorithm,
                     path: Path, staged: Staged | None) -> Path:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = [_with_type2_attributes(d) for d in datasets]
    if labels.shape[2] != len(sources):
        raise InputDataError(path.parent, f"label map has {labels.shape[2]} slices but the series {len(sources)} files")
    values = sorted(v for v in label_names if v != 0)
    # highdicom wants segment numbers 1..N: remap label values, whatever they are.
    lut = np.zeros(max([*values, int(labels.max()), 0]) + 1, dtype=np.uint8)
    for number, value in enumerate(values, start=1):
        lut[value] = number
    frames = np.ascontiguousarray(lut[labels].transpose(2, 1, 0))  # (slices, rows, columns)
    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm.name[:64], family=codes.cid7162.ArtificialIntelligence, version=algorithm.version[:64],
        source="unet-pipeline",
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=str(label_names[value])[:64],
            segmented_property_category=codes.cid7150.Tissue, segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=identification,
        )
        for number, value in enumerate(values, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=_series_number(sources),
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="unet-pipeline",
        manufacturer_model_name=algorithm.name[:64], software_versions=algorithm.software_version[:64],
        device_serial_number="0", series_description=algorithm.series_description,
        content_label="SEGMENTATION", content_description=f"{algorithm.name} {algorithm.version}"[:64],
    )
    save_file(path, staged, ".dcm", seg.save_as)
    return path


# Type 2 attributes of the patient and study modules that a SEG must carry (empty is allowed);
# anonymised sources often lack them, and highdicom reads each one.
_TYPE2 = {"PatientName": "", "PatientID": "", "PatientBirthDate": "", "PatientSex": "", "StudyDate": "",
          "StudyTime": "", "ReferringPhysicianName": "", "StudyID": "", "AccessionNumber": ""}


def _with_type2_attributes(dataset: Any) -> Any:
    for keyword, empty in _TYPE2.items():
        if keyword not in dataset:
            setattr(dataset, keyword, empty)
    return dataset


def _series_number(sources: Sequence[object]) -> int:
    number = getattr(sources[0], "SeriesNumber", None)
    try:
        return int(number) + 1000 if number not in (None, "") else 1000
    except (TypeError, ValueError):
        return 1000
