"""Batch prediction: inputs to cases, sharding across ``torchrun`` ranks, skip-if-done, per-case outputs.

Inputs are NIfTI files, DICOM series folders, or folders of them (one level: the
NIfTI files and the series sub-folders inside). Multi-channel models take nnU-Net's
``CASE_0000``, ``CASE_0001``... files. Under ``torchrun`` (``RANK``/``WORLD_SIZE``) each
process takes every ``WORLD_SIZE``-th case, so no case is predicted twice and none is
missed. A case whose outputs all exist is skipped unless ``overwrite``. A case that
fails is reported on one line and the others go on.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.data import Staged, save_file, strip_nifti_suffix
from pipeline.errors import InputDataError, user_error
from pipeline.inference.dicom_rtstruct import write_dicom_rtstruct
from pipeline.inference.dicom_seg import Algorithm, write_dicom_seg
from pipeline.inference.dicom_sr import measurements_of, review_of, write_dicom_sr
from pipeline.inference.outputs import RECORD_SUFFIX, THUMBNAILS, CaseOutputs, write_label_map, write_probabilities
from pipeline.inference.predictor import Predictor
from pipeline.inference.settings import package_version
from pipeline.quality import overlay_thumbnail, read_record, write_record, write_report, write_summary_csv
from transforms.readers import NIFTI_SUFFIXES


@dataclass(frozen=True)
class CaseInput:
    """One case to predict.

    Args:
        name: the case's name (input file name without suffix, or folder name).
        images: one path per channel.
        dicom: the input is a DICOM series folder (a SEG is written too).
    """

    name: str
    images: tuple[Path, ...]
    dicom: bool


def _looks_like_dicom_folder(folder: Path) -> bool:
    """A folder holding DICOM files directly (magic bytes or a DICOM ending), not sub-folders of them."""
    for path in folder.iterdir():
        if not path.is_file():
            continue
        if path.name.lower().endswith((".dcm", ".dicom", ".ima")):
            return True
        try:
            with path.open("rb") as fp:
                fp.seek(128)
                if fp.read(4) == b"DICM":
                    return True
        except OSError:
            continue
    return False


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def expand_inputs(inputs: Sequence[str | Path]) -> list[tuple[Path, bool]]:
    """Every input image: ``(path, is_dicom_series)``, folders of inputs opened one level.

    Args:
        inputs: NIfTI files, DICOM series folders, or folders holding them.
    """
    found: list[tuple[Path, bool]] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise InputDataError(path, "input not found")
        if path.is_file():
            if not _is_nifti(path):
                raise InputDataError(path, "unsupported input: expected a .nii/.nii.gz file or a DICOM series folder")
            found.append((path, False))
        elif _looks_like_dicom_folder(path):
            found.append((path, True))
        else:
            inside = []
            for entry in sorted(path.iterdir()):
                if entry.is_file() and _is_nifti(entry):
                    inside.append((entry, False))
                elif entry.is_dir() and _looks_like_dicom_folder(entry):
                    inside.append((entry, True))
            if not inside:
                raise InputDataError(path, "holds no DICOM series, no NIfTI image and no sub-folder with a DICOM series")
            found += inside
    return found


def group_cases(found: Sequence[tuple[Path, bool]], channels: int) -> list[CaseInput]:
    """Cases from input images; with several channels, ``CASE_0000``, ``CASE_0001``... files form a case.

    Args:
        found: from :func:`expand_inputs`.
        channels: the model's input channels.
    """
    if channels == 1:
        cases = [CaseInput(strip_nifti_suffix(p.name), (p,), dicom) for p, dicom in found]
    else:
        groups: dict[str, list[Path]] = {}
        for p, dicom in sorted(found):
            match = re.fullmatch(r"(.+)_(\d{4})", strip_nifti_suffix(p.name))
            if dicom or not match:
                raise InputDataError(p, f"the model takes {channels} channels: name inputs CASE_0000, CASE_0001, ...")
            groups.setdefault(match.group(1), []).append(p)
        for case_id, files in groups.items():
            if len(files) != channels:
                raise InputDataError(files[0], f"case '{case_id}' has {len(files)} channel file(s), the model takes {channels}")
        cases = [CaseInput(name, tuple(files), False) for name, files in groups.items()]
    seen: dict[str, Path] = {}
    for case in cases:
        if case.name in seen:
            raise InputDataError(case.images[0], f"has the same case name as {seen[case.name]}: their outputs would collide")
        seen[case.name] = case.images[0]
    return cases


def shard(cases: Sequence[CaseInput]) -> list[CaseInput]:
    """This process's share of the cases under ``torchrun`` (every case otherwise).

    Args:
        cases: all cases, in the same order on every process.
    """
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return list(cases[rank::world]) if world > 1 else list(cases)


@dataclass
class PredictReport:
    """What a batch prediction did.

    Args:
        written: the output files written, per case name.
        skipped: cases whose outputs were already complete.
        failed: ``(case input, one-line reason)`` per failed case.
        records: the case records of the batch (written and skipped cases), by case name.
        summary: ``summary.csv`` and ``report.html``, once every case of the batch has its record.
    """

    written: dict[str, list[Path]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    summary: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class _Job:
    """The fixed parts of one batch."""

    predictor: Predictor
    algorithm: Algorithm
    series_uid: str | None
    min_expected_dice: float | None


def predict_cases(
    predictor: Predictor,
    cases: Sequence[CaseInput],
    out_dir: Path,
    algorithm: Algorithm,
    series_uid: str | None = None,
    save_probabilities: bool = False,
    write_seg: bool = True,
    overwrite: bool = False,
    on_error: Callable[[Path, str], None] | None = None,
    min_expected_dice: float | None = None,
    batch: Sequence[CaseInput] | None = None,
    write_rtstruct: bool = False,
) -> PredictReport:
    """Predict each case and write its outputs (skipping complete ones unless ``overwrite``).

    Per case: the label map, the record ``CASE.json`` (volumes, estimated Dice, input check,
    review flag and reasons) and, for DICOM inputs, the SEG and an SR of the measurements (and an RTSTRUCT
    on request).
    For the batch: ``summary.csv`` and ``report.html``, written once every case has its record.

    Args:
        predictor: the model(s).
        cases: the cases (already sharded).
        out_dir: the output folder (created).
        algorithm: the model's identity for DICOM SEG and SR and the records.
        series_uid: the series to read from DICOM folders holding several.
        save_probabilities: also write per-class probabilities.
        write_seg: write a DICOM SEG (and SR) for DICOM series inputs.
        overwrite: redo cases whose outputs exist.
        on_error: called with (input, reason) for each failed case (default: print ``error: ...``).
        min_expected_dice: the review threshold (``None``: the model's, chosen on validation).
        batch: every case of the batch, all ranks together (default: ``cases``): the summary covers them.
        write_rtstruct: also write an RTSTRUCT (AUTOMATIC ROIs) for DICOM series inputs.
    """
    report = PredictReport()
    job = _Job(predictor, algorithm, series_uid, min_expected_dice)
    todo = []
    for case in cases:
        outputs = CaseOutputs.for_case(out_dir, case.name, save_probabilities, write_seg and case.dicom,
                                       write_rtstruct and case.dicom)
        if outputs.complete() and not overwrite:
            report.skipped.append(case.name)
        else:
            todo.append((case, outputs))
    if todo:
        out_dir.mkdir(parents=True, exist_ok=True)
        _predict_todo(job, todo, report, on_error)
    _write_summary(out_dir, batch if batch is not None else cases, report, algorithm)
    return report


def _predict_todo(job: _Job, todo: list[tuple[CaseInput, CaseOutputs]], report: PredictReport,
                  on_error: Callable[[Path, str], None] | None) -> None:
    rank = int(os.environ.get("RANK", 0))
    bar = tqdm(total=len(todo), desc=f"predict{f' rank {rank}' if rank else ''}", unit="case", position=rank,
               leave=False, file=sys.stderr)
    try:
        loaded_cases = job.predictor.iter_loaded([case.images for case, _ in todo])
        for (case, outputs), loaded in zip(todo, loaded_cases):
            bar.set_postfix_str(f"case {len(report.written) + len(report.failed) + 1}/{len(todo)}")
            try:
                if isinstance(loaded, BaseException):
                    raise loaded
                report.written[case.name] = _predict_one(job, case, outputs, loaded)
            except Exception as error:
                cause = user_error(error)
                if cause is None:
                    raise
                reason = str(cause)
                report.failed.append((case.images[0], reason))
                if on_error is not None:
                    on_error(case.images[0], reason)
                else:
                    bar.clear()  # the error must start its own line, not follow the bar's
                    print(f"error: {reason}", file=sys.stderr, flush=True)
                    bar.refresh()
            bar.update()
    finally:
        bar.close()


def _predict_one(job: _Job, case: CaseInput, outputs: CaseOutputs, loaded: Any) -> list[Path]:
    """Predict one case and write all of its files together (or none of them)."""
    predictor = job.predictor
    result = predictor.predict_loaded(loaded, probabilities=outputs.probabilities is not None, quality=True)
    names = {v: n for v, n in predictor.labels.items() if v != 0}
    files = {"mask": outputs.labels.name, "seg": outputs.seg.name if outputs.seg else None,
             "sr": outputs.sr.name if outputs.sr else None}
    if outputs.rtstruct is not None:
        files["rtstruct"] = outputs.rtstruct.name
    assert result.view is not None
    record = predictor.record(case.name, result, {"name": job.algorithm.name, "version": job.algorithm.version},
                              files, job.min_expected_dice)
    thumbnail = overlay_thumbnail(result.view[0], result.view[1], result.view[2], list(names))
    with Staged() as staged:
        written = [write_label_map(result.labels, result.affine, outputs.labels, staged)]
        if outputs.probabilities is not None:
            written.append(write_probabilities(result.probabilities, result.affine, outputs.probabilities, staged))
        if outputs.seg is not None and outputs.sr is not None:
            sources = _sources(case, job.series_uid)
            written.append(_write_seg(sources, result.labels, names, job.algorithm, outputs.seg, staged))
            written.append(write_dicom_sr(staged.written(outputs.seg), sources, measurements_of(record), job.algorithm,
                                          outputs.sr, staged, review_of(record)))
        if outputs.rtstruct is not None:
            written.append(_write_rtstruct(_sources(case, job.series_uid), result.labels, names, job.algorithm,
                                           outputs.rtstruct, staged))
        if outputs.thumbnail is not None:
            outputs.thumbnail.parent.mkdir(exist_ok=True)
            save_file(outputs.thumbnail, staged, ".png", lambda tmp: Path(tmp).write_bytes(thumbnail))
        # The record last: a case is done when its record exists.
        written.append(write_record(record, outputs.record, staged))
    return written


def _write_summary(out_dir: Path, batch: Sequence[CaseInput], report: PredictReport, algorithm: Algorithm) -> None:
    """``summary.csv`` and ``report.html`` of the batch, once every case of it has a record (the last rank writes them)."""
    for case in batch:
        record = read_record(out_dir / f"{case.name}{RECORD_SUFFIX}")
        if record is None:
            return
        report.records[case.name] = record
    if not batch:
        return
    thumbnails = {}
    for name in report.records:
        png = out_dir / THUMBNAILS / f"{name}.png"
        if png.is_file():
            thumbnails[name] = png.read_bytes()
    records = list(report.records.values())
    report.summary = [write_summary_csv(records, out_dir / "summary.csv"),
                      write_report(records, out_dir / "report.html", thumbnails,
                                   f"{algorithm.name} v{algorithm.version}: {len(records)} case(s)")]


def _sources(case: CaseInput, series_uid: str | None) -> list[Path]:
    from transforms.dicom import series_files

    return series_files(case.images[0], series_uid)


def _write_seg(sources: list[Path], labels, names: dict[int, str], algorithm: Algorithm, path: Path,
               staged: Staged) -> Path:
    try:
        return write_dicom_seg(labels, sources, names, algorithm, path, staged)
    except InputDataError as error:
        raise InputDataError(error.path, f"{error.problem}; use --no-seg for the NIfTI mask alone") from None


def _write_rtstruct(sources: list[Path], labels, names: dict[int, str], algorithm: Algorithm, path: Path,
                    staged: Staged) -> Path:
    try:
        return write_dicom_rtstruct(labels, sources, names, algorithm, path, staged)
    except InputDataError as error:
        raise InputDataError(error.path, f"{error.problem}; leave out --rtstruct for the mask and SEG alone") from None


def algorithm_for(name: str, version: str) -> Algorithm:
    """The SEG identity of a model.

    Args:
        name: registered model name.
        version: registered version (or run id / checkpoint name).
    """
    return Algorithm(name=name, version=version, software_version=f"unet-pipeline {package_version()}")


def exit_code(report: PredictReport) -> int:
    """0 when every case was written or skipped, 2 when all failed (bad inputs), 10 when some did.

    Args:
        report: the batch's report.
    """
    from pipeline.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_PARTIAL_FAILURE

    if not report.failed:
        return EXIT_OK
    return EXIT_PARTIAL_FAILURE if report.written or report.skipped else EXIT_BAD_INPUT
