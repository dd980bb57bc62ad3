"""What ``predict`` writes for a case: a NIfTI label map, optional probabilities, a DICOM SEG.

Every file is written under a temporary name in the target folder, flushed and
renamed, so a reader never sees half a file; it gets ordinary permissions (what the
process's umask allows, e.g. 0644), not the 0600 of a temporary file, so colleagues
in the same group can read the results. A case counts as done when all of its
expected files exist; a re-run skips done cases unless asked to overwrite.

Outputs are named after the input (a NIfTI file's name without its suffix, a DICOM
folder's name) with a fixed suffix, nothing taken from image headers.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from pipeline.errors import InputDataError

LABELS_SUFFIX = ".nii.gz"
PROBABILITIES_SUFFIX = "_probabilities.nii.gz"
SEG_SUFFIX = ".seg.dcm"


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


def write_label_map(labels: np.ndarray, affine: np.ndarray, path: Path, staged: Staged | None = None) -> Path:
    """Write a uint8 label map as NIfTI (qform and sform = ``affine``), atomically.

    Args:
        labels: ``(X, Y, Z)`` label values.
        affine: 4x4 RAS affine of the input's grid.
        path: the target ``.nii.gz``.
        staged: write as part of these staged files (committed together); default: on its own.
    """
    image = nib.Nifti1Image(np.asarray(labels, dtype=np.uint8), np.asarray(affine, dtype=np.float64))
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    _save(path, staged, ".nii.gz", lambda tmp: nib.save(image, tmp))
    return path


def _save(path: Path, staged: Staged | None, suffix: str, write: Callable[[Path], object]) -> None:
    if staged is not None:
        write(staged.path(path, suffix))
        return
    with atomic_file(path, suffix) as tmp:
        write(tmp)


def write_probabilities(probabilities: np.ndarray, affine: np.ndarray, path: Path, staged: Staged | None = None) -> Path:
    """Write per-class probabilities as a 4D float32 NIfTI ``(X, Y, Z, classes)``, atomically.

    Args:
        probabilities: ``(classes, X, Y, Z)`` softmax on the input's grid.
        affine: 4x4 RAS affine.
        path: the target ``.nii.gz``.
        staged: write as part of these staged files (committed together); default: on its own.
    """
    data = np.moveaxis(np.asarray(probabilities, dtype=np.float32), 0, -1)
    image = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_intent("vector", name="class probabilities")
    _save(path, staged, ".nii.gz", lambda tmp: nib.save(image, tmp))
    return path


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
    _save(path, staged, ".dcm", seg.save_as)
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


@dataclass(frozen=True)
class CaseOutputs:
    """The files one case produces.

    Args:
        labels: the NIfTI label map.
        probabilities: the probabilities file, when asked for.
        seg: the DICOM SEG, when the input is a DICOM series.
    """

    labels: Path
    probabilities: Path | None = None
    seg: Path | None = None

    @classmethod
    def for_case(cls, out_dir: Path, name: str, probabilities: bool, seg: bool) -> CaseOutputs:
        """The expected outputs of case ``name`` in ``out_dir``.

        Args:
            out_dir: the output folder.
            name: the case's name (from its input file or folder name).
            probabilities: ``--save-probabilities``.
            seg: the input is a DICOM series (and SEG output is on).
        """
        return cls(out_dir / f"{name}{LABELS_SUFFIX}",
                   out_dir / f"{name}{PROBABILITIES_SUFFIX}" if probabilities else None,
                   out_dir / f"{name}{SEG_SUFFIX}" if seg else None)

    @property
    def paths(self) -> list[Path]:
        """Every expected file."""
        return [p for p in (self.labels, self.probabilities, self.seg) if p is not None]

    def complete(self) -> bool:
        """Whether every expected file exists (each is written atomically, so existing means whole)."""
        return all(p.is_file() for p in self.paths)

