"""What ``predict`` writes for a case: a NIfTI label map, its record, optional probabilities, a DICOM SEG and SR
(and, on request, an RTSTRUCT).

Every file is written through :class:`~pipeline.data.files.Staged` (temporary name,
flush, rename, ordinary permissions), so a reader never sees half a file. A case
counts as done when all of its expected files exist; a re-run skips done cases
unless asked to overwrite.

Outputs are named after the input (a NIfTI file's name without its suffix, a DICOM
folder's name) with a fixed suffix, nothing taken from image headers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.data import Staged, save_file

LABELS_SUFFIX = ".nii.gz"
PROBABILITIES_SUFFIX = "_probabilities.nii.gz"
SEG_SUFFIX = ".seg.dcm"
SR_SUFFIX = ".sr.dcm"
RTSTRUCT_SUFFIX = ".rtstruct.dcm"
RECORD_SUFFIX = ".json"
THUMBNAILS = ".thumbnails"


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
    save_file(path, staged, ".nii.gz", lambda tmp: nib.save(image, tmp))
    return path


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
    save_file(path, staged, ".nii.gz", lambda tmp: nib.save(image, tmp))
    return path


@dataclass(frozen=True)
class CaseOutputs:
    """The files one case produces.

    Args:
        labels: the NIfTI label map.
        probabilities: the probabilities file, when asked for.
        seg: the DICOM SEG, when the input is a DICOM series.
        record: the case record (``CASE.json``: volumes, estimated Dice, flag and reasons).
        sr: the DICOM SR (TID 1500) of the volumes and estimated Dice, beside the SEG.
        thumbnail: the review thumbnail the batch report embeds (not required for a case to be done).
        rtstruct: the DICOM RTSTRUCT (AUTOMATIC ROIs), when asked for and the input is a DICOM series.
    """

    labels: Path
    probabilities: Path | None = None
    seg: Path | None = None
    record: Path | None = None
    sr: Path | None = None
    thumbnail: Path | None = None
    rtstruct: Path | None = None

    @classmethod
    def for_case(cls, out_dir: Path, name: str, probabilities: bool, seg: bool, rtstruct: bool = False) -> CaseOutputs:
        """The expected outputs of case ``name`` in ``out_dir``.

        Args:
            out_dir: the output folder.
            name: the case's name (from its input file or folder name).
            probabilities: ``--save-probabilities``.
            seg: the input is a DICOM series (and SEG output is on).
            rtstruct: the input is a DICOM series and ``--rtstruct`` asks for an RTSTRUCT.
        """
        return cls(out_dir / f"{name}{LABELS_SUFFIX}",
                   out_dir / f"{name}{PROBABILITIES_SUFFIX}" if probabilities else None,
                   out_dir / f"{name}{SEG_SUFFIX}" if seg else None,
                   out_dir / f"{name}{RECORD_SUFFIX}",
                   out_dir / f"{name}{SR_SUFFIX}" if seg else None,
                   out_dir / THUMBNAILS / f"{name}.png",
                   out_dir / f"{name}{RTSTRUCT_SUFFIX}" if rtstruct else None)

    @property
    def paths(self) -> list[Path]:
        """Every expected file."""
        return [p for p in (self.labels, self.probabilities, self.seg, self.record, self.sr, self.rtstruct)
                if p is not None]

    def complete(self) -> bool:
        """Whether every expected file exists (each is written atomically, so existing means whole)."""
        return all(p.is_file() for p in self.paths)
