"""The evaluate stage: Dice, HD95 and surface Dice per label against reference labels, on the input's grid.

Two passes. The first predicts each case (raw argmax, no postprocessing), checks it
against its label file and keeps both on disk; when asked, it also scores the four
keep-largest-component variants, from which :func:`pipeline.evaluation.postprocessing_choice.decide`
chooses the postprocessing. The second pass applies the postprocessing (the decided
one, or the model's stored one), scores the final predictions, writes them as NIfTI
and draws a QC picture per case.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import LoadImage
from tqdm import tqdm

from pipeline.data import Case
from pipeline.errors import InputDataError
from pipeline.evaluation.metrics import dice_per_label, nanmean, surface_metrics, write_evaluation
from pipeline.evaluation.postprocessing_choice import Decision, decide, variant_scores
from pipeline.evaluation.quality_review import (
    CaseQuality,
    calibration_plot,
    quality_records,
    write_quality_outputs,
    write_quality_records,
)
from pipeline.inference import Postprocessing, Predictor, write_label_map
from pipeline.quality import Calibration, fit_calibration, overlay_thumbnail
from transforms.readers import MedicalImageReader

SURFACE_METRICS = ("hd95", "surface_dice")


@dataclass
class EvaluationResult:
    """What an evaluation produced.

    Args:
        summary: ``summary.json``'s content (means per label, postprocessing...).
        rows: one row per case (``case`` and the metrics by label name).
        postprocessing: the postprocessing the final predictions got.
        decision: the validation decision, when one was made.
        predictions: case id -> the final prediction's NIfTI file.
        qc_images: case id -> its QC picture.
        calibration: the quality calibration fitted on these cases (``calibrate``) or the model's.
        records: one quality record per case (estimated and true Dice, volumes, flag).
        report: the batch report (``report.html``), when written.
        calibration_plot: estimated against true Dice (``calibration.png``), when calibrated here.
    """

    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    postprocessing: Postprocessing
    decision: Decision | None = None
    predictions: dict[str, Path] = field(default_factory=dict)
    qc_images: dict[str, Path] = field(default_factory=dict)
    calibration: Calibration | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    report: Path | None = None
    calibration_plot: Path | None = None


def _spacing(affine: np.ndarray) -> list[float]:
    return [float(s) for s in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))]


def _read_reference(read: LoadImage, case: Case, known: list[int]) -> tuple[Any, np.ndarray]:
    """A case's label image and its values as an array, checked against the values the model predicts."""
    if case.label is None:
        raise InputDataError(case.images[0], "has no label to evaluate against")
    label = read(str(case.label))  # a bad label file fails before the costly prediction
    truth = np.asarray(label).astype(np.uint8 if int(np.max(label)) < 256 else np.int32)
    # A value the model cannot predict would be silently scored as background everywhere.
    unknown = sorted(set(np.unique(truth).tolist()) - set(known))
    if unknown:
        raise InputDataError(case.label, f"holds label value(s) {unknown} that the model does not predict "
                                         f"(its labels: {known})")
    return label, truth


def _raw_pass(
    predictor: Predictor, cases: Sequence[Case], read: LoadImage, work: Path, values: list[int],
    decide_postprocessing: bool,
) -> tuple[list[dict[str, dict[int, float]]], list[dict[int, float]], list[CaseQuality]]:
    """Pass 1: predict each case without postprocessing, check it against its label and keep both in ``work``.

    Returns the postprocessing variants' Dice per case (only when deciding), the raw Dice per case and
    what the quality review needs of each case (its review view is kept in ``work``).
    """
    known = sorted(predictor.labels)
    variants, raw_scores, quality = [], [], []
    loaded_cases = predictor.iter_loaded([c.images for c in cases])
    for index, (case, loaded) in enumerate(tqdm(zip(cases, loaded_cases), total=len(cases), desc="evaluate",
                                                unit="case", leave=False)):
        label, truth = _read_reference(read, case, known)
        if isinstance(loaded, BaseException):
            raise loaded
        pred = predictor.predict_loaded(loaded, postprocess=False, quality=True)
        if truth.shape != pred.labels.shape:
            raise InputDataError(case.label, f"label shape {truth.shape} differs from its image's {pred.labels.shape}")
        # Same shape is not enough: a label on a shifted/rotated grid would be scored voxel by voxel against
        # the wrong anatomy. Same tolerance as the preprocess stage's image/label check.
        if not np.allclose(np.asarray(label.affine, dtype=np.float64), pred.affine, atol=1e-3):
            raise InputDataError(case.label, "label affine (orientation/spacing/origin) differs from the image's")
        if decide_postprocessing:
            variants.append(variant_scores(pred.labels, truth, values))
            raw_scores.append(variants[-1]["raw"])
        else:
            raw_scores.append(dice_per_label(pred.labels, truth, values))
        assert pred.view is not None and pred.signals is not None and pred.conformity is not None
        quality.append(CaseQuality(pred.signals, pred.conformity))
        np.savez(work / f"{index}.npz", raw=pred.labels, truth=truth, affine=pred.affine, view_image=pred.view[0],
                 view_labels=pred.view[1], view_spacing=pred.view[2])
    return variants, raw_scores, quality


@dataclass
class _Final:
    """What pass 2 produced: ``cases.csv`` rows, files, and per case the final map, its Dice and its thumbnail."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    predictions: dict[str, Path] = field(default_factory=dict)
    pictures: dict[str, Path] = field(default_factory=dict)
    finals: list[np.ndarray] = field(default_factory=list)
    affines: list[np.ndarray] = field(default_factory=list)
    dice: list[dict[int, float]] = field(default_factory=list)
    thumbnails: dict[str, bytes] = field(default_factory=dict)


def _final_pass(
    cases: Sequence[Case], read: LoadImage, work: Path, post: Postprocessing, labels: dict[int, str], out_dir: Path,
    save_predictions: bool, surface_tolerance_mm: float, qc: bool, report: bool,
) -> _Final:
    """Pass 2: apply ``post`` to each raw prediction kept in ``work``, score it, write its NIfTI and QC picture."""
    values = list(labels)
    out = _Final()
    rows, predictions, pictures = out.rows, out.predictions, out.pictures
    for index, case in enumerate(cases):
        with np.load(work / f"{index}.npz") as stored:
            raw, truth, affine = stored["raw"], stored["truth"], stored["affine"]
            view = (stored["view_image"], stored["view_labels"], stored["view_spacing"].tolist())
        final = post.apply(raw) if post.active else raw
        scores = dice_per_label(final, truth, values)
        out.finals.append(final)
        out.affines.append(affine)
        out.dice.append(scores)
        if report:
            view_labels = post.apply(view[1]) if post.active else view[1]
            out.thumbnails[case.case_id] = overlay_thumbnail(view[0], view_labels, view[2], values)
        spacing = _spacing(affine)
        surface = surface_metrics(final, truth, values, spacing, surface_tolerance_mm)
        row: dict[str, Any] = {"case": case.case_id, **{labels[v]: d for v, d in scores.items()}}
        for metric in SURFACE_METRICS:
            row.update({f"{metric} {labels[v]}": surface[v][metric] for v in values})
        rows.append(row)
        if save_predictions:
            predictions[case.case_id] = write_label_map(final, affine, out_dir / "predictions" / f"{case.case_id}.nii.gz")
        if qc:
            from pipeline.evaluation.qc_pictures import case_qc_image

            image = np.asarray(read(str(case.images[0])), dtype=np.float32)
            pictures[case.case_id] = case_qc_image(image, truth, final, labels, out_dir / "qc" / f"{case.case_id}.png",
                                                   spacing)
    return out


def evaluate_cases(
    predictor: Predictor,
    cases: Sequence[Case],
    out_dir: Path,
    decide_postprocessing: bool = False,
    save_predictions: bool = True,
    surface_tolerance_mm: float = 1.0,
    qc: bool = False,
    report: bool = True,
    calibrate: bool = False,
    min_expected_dice: float | None = None,
    flag_quantile: float = 0.19,
    model: Mapping[str, str] | None = None,
    estimator: str = "linear",
) -> EvaluationResult:
    """Segment each case, score it against its label, and write ``cases.csv`` and ``summary.json``.

    Dice is NaN for a label absent from both prediction and reference, and such
    cases are left out of that label's mean (as nnU-Net does).

    Args:
        predictor: the model(s) to evaluate.
        cases: labelled cases.
        out_dir: the output folder (created): ``cases.csv``, ``summary.json``, ``quality_records.json``,
            ``predictions/<case>.nii.gz``, ``qc/<case>.png``.
        decide_postprocessing: choose keep-largest-component removal on these cases;
            otherwise apply the model's stored decision.
        save_predictions: write each final prediction.
        surface_tolerance_mm: the surface Dice tolerance.
        qc: draw a QC picture per case.
        report: write ``report.html`` and ``quality.csv`` (estimated beside true Dice, volumes, flags).
        calibrate: fit the quality estimate's calibration on these cases (validation) and draw
            ``calibration.png``; otherwise the model's stored calibration is applied.
        min_expected_dice: with ``calibrate``, a fixed review threshold (``None``: chosen on these cases).
        flag_quantile: with ``calibrate``, the share of these cases the chosen threshold flags.
        estimator: with ``calibrate``, the map from signals to an estimated Dice (``qc.estimator``: ``linear`` or
            ``agreement``; :func:`~pipeline.quality.calibration.fit_calibration`).
        model: ``name`` and ``version`` for the records.
    """
    labels = {v: n for v, n in predictor.labels.items() if v != 0}
    values = list(labels)
    read = LoadImage(reader=MedicalImageReader(), image_only=True)
    work = out_dir / ".pass1"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        variants, raw_scores, quality = _raw_pass(predictor, cases, read, work, values, decide_postprocessing)
        decision = decide(variants, values) if decide_postprocessing else None
        post = decision.postprocessing if decision else predictor.postprocessing
        final = _final_pass(cases, read, work, post, labels, out_dir, save_predictions, surface_tolerance_mm, qc,
                            report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    extra: dict[str, Any] = {"postprocessing": post.to_dict(), "postprocessing_applied": post.describe(labels),
                             "mean_dice_without_postprocessing": nanmean(
                                 [nanmean([r[v] for r in raw_scores]) for v in values]),
                             "surface_tolerance_mm": surface_tolerance_mm}
    if decision is not None:
        extra["postprocessing_decision"] = {"mean_dice": decision.mean_dice, "label_dice": {
            variant: {labels[v]: d for v, d in per_label.items()} for variant, per_label in decision.label_dice.items()}}
    summary = write_evaluation(final.rows, list(labels.values()), out_dir, extra, metrics=SURFACE_METRICS)
    result = EvaluationResult(summary, final.rows, post, decision, final.predictions, final.pictures)
    _quality_review(result, predictor, cases, quality, final, labels, out_dir, report, calibrate, min_expected_dice,
                    flag_quantile, model or {}, estimator)
    return result


def _quality_review(
    result: EvaluationResult, predictor: Predictor, cases: Sequence[Case], quality: list[CaseQuality], final: _Final,
    labels: dict[int, str], out_dir: Path, report: bool, calibrate: bool, min_expected_dice: float | None,
    flag_quantile: float, model: Mapping[str, str], estimator: str = "linear",
) -> None:
    """Calibrate (validation) or apply the model's calibration, then the records and, when asked, the report."""
    signals = [q.signals for q in quality]
    result.calibration = (fit_calibration(signals, final.dice, min_expected_dice, flag_quantile, estimator=estimator)
                          if calibrate
                          else predictor.calibration)
    if calibrate and result.calibration.labels:
        result.calibration_plot = calibration_plot(result.calibration, signals, final.dice, labels,
                                                   out_dir / "calibration.png")
    settings = {**predictor.settings[0].to_dict(), "postprocessing": result.postprocessing.to_dict()}
    result.records = quality_records([c.case_id for c in cases], final.finals, final.affines, quality, final.dice,
                                     labels, result.calibration, model, settings)
    write_quality_records(result.records, out_dir)
    if report:
        name = model.get("name")
        title = f"Evaluation of {name} v{model.get('version', '')}" if name else "Evaluation"
        result.report = write_quality_outputs(result.records, final.thumbnails, out_dir, title)[1]


def validate_and_export(
    settings: Any, device: Any, plan: dict[str, Any], val_cases: Sequence[Case], chosen: Path, out_dir: Path,
    decide_postprocessing: bool = True, surface_tolerance_mm: float = 1.0, qc: bool = True,
    min_expected_dice: float | None = None, flag_quantile: float = 0.19, estimator: str = "linear",
) -> tuple[EvaluationResult, Path, dict[str, Any]]:
    """Evaluate the chosen checkpoint on the held-out cases with the configured settings, decide the
    postprocessing there, and write ``model.pt``: the weights with the settings they were validated with.

    Args:
        settings: the :class:`~pipeline.inference.InferenceSettings` to validate with.
        device: where the network runs.
        plan: the preprocessing plan (label names for the stored settings).
        val_cases: the held-out cases.
        chosen: the checkpoint to validate (``final.pt`` or ``best.pt``); ``model.pt`` is written beside it.
        out_dir: the evaluation folder.
        decide_postprocessing: decide keep-largest-component on these cases.
        surface_tolerance_mm: the surface Dice tolerance.
        qc: write a QC picture per case.
        min_expected_dice: a fixed review threshold (``None``: chosen on the validation cases).
        flag_quantile: the share of validation cases the chosen threshold flags.
        estimator: the map from signals to an estimated Dice (``qc.estimator``).

    Returns:
        The evaluation, the exported model's path and its ``inference`` section (with the quality
        estimate's calibration, fitted on the same cases).
    """
    import dataclasses

    from pipeline.inference import LoadedModel, inference_section, load_checkpoint, load_model_from_checkpoint, save_checkpoint

    state = load_checkpoint(chosen)
    model: LoadedModel = load_model_from_checkpoint(state, device)
    model.settings = settings
    evaluation = evaluate_cases(Predictor([model], device), val_cases, out_dir,
                                decide_postprocessing=decide_postprocessing, surface_tolerance_mm=surface_tolerance_mm,
                                qc=qc, calibrate=True, min_expected_dice=min_expected_dice, flag_quantile=flag_quantile,
                                estimator=estimator)
    validated = dataclasses.replace(settings, postprocessing=evaluation.postprocessing)
    section = inference_section(validated, plan, validated=True)
    if evaluation.calibration is not None and evaluation.calibration.labels:
        section["quality"] = evaluation.calibration.to_dict()
    model_path = chosen.with_name("model.pt")
    save_checkpoint({k: state[k] for k in ("model", "plan", "patch_size", "state_dict")}
                    | {"inference": section, "epoch": state.get("epoch"), "source_checkpoint": chosen.name}, model_path)
    return evaluation, model_path, section
