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
from collections.abc import Sequence
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
from pipeline.inference import Postprocessing, Predictor, write_label_map
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
    """

    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    postprocessing: Postprocessing
    decision: Decision | None = None
    predictions: dict[str, Path] = field(default_factory=dict)
    qc_images: dict[str, Path] = field(default_factory=dict)


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
) -> tuple[list[dict[str, dict[int, float]]], list[dict[int, float]]]:
    """Pass 1: predict each case without postprocessing, check it against its label and keep both in ``work``.

    Returns the postprocessing variants' Dice per case (only when deciding) and the raw Dice per case.
    """
    known = sorted(predictor.labels)
    variants, raw_scores = [], []
    loaded_cases = predictor.iter_loaded([c.images for c in cases])
    for index, (case, loaded) in enumerate(tqdm(zip(cases, loaded_cases), total=len(cases), desc="evaluate",
                                                unit="case", leave=False)):
        label, truth = _read_reference(read, case, known)
        if isinstance(loaded, BaseException):
            raise loaded
        pred = predictor.predict_loaded(loaded, postprocess=False)
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
        np.savez(work / f"{index}.npz", raw=pred.labels, truth=truth, affine=pred.affine)
    return variants, raw_scores


def _final_pass(
    cases: Sequence[Case], read: LoadImage, work: Path, post: Postprocessing, labels: dict[int, str], out_dir: Path,
    save_predictions: bool, surface_tolerance_mm: float, qc: bool,
) -> tuple[list[dict[str, Any]], dict[str, Path], dict[str, Path]]:
    """Pass 2: apply ``post`` to each raw prediction kept in ``work``, score it, write its NIfTI and QC picture.

    Returns the rows of ``cases.csv``, and case id -> prediction file and -> QC picture.
    """
    values = list(labels)
    rows, predictions, pictures = [], {}, {}
    for index, case in enumerate(cases):
        with np.load(work / f"{index}.npz") as stored:
            raw, truth, affine = stored["raw"], stored["truth"], stored["affine"]
        final = post.apply(raw) if post.active else raw
        scores = dice_per_label(final, truth, values)
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
    return rows, predictions, pictures


def evaluate_cases(
    predictor: Predictor,
    cases: Sequence[Case],
    out_dir: Path,
    decide_postprocessing: bool = False,
    save_predictions: bool = True,
    surface_tolerance_mm: float = 1.0,
    qc: bool = False,
) -> EvaluationResult:
    """Segment each case, score it against its label, and write ``cases.csv`` and ``summary.json``.

    Dice is NaN for a label absent from both prediction and reference, and such
    cases are left out of that label's mean (as nnU-Net does).

    Args:
        predictor: the model(s) to evaluate.
        cases: labelled cases.
        out_dir: the output folder (created): ``cases.csv``, ``summary.json``,
            ``predictions/<case>.nii.gz``, ``qc/<case>.png``.
        decide_postprocessing: choose keep-largest-component removal on these cases;
            otherwise apply the model's stored decision.
        save_predictions: write each final prediction.
        surface_tolerance_mm: the surface Dice tolerance.
        qc: draw a QC picture per case.
    """
    labels = {v: n for v, n in predictor.labels.items() if v != 0}
    values = list(labels)
    read = LoadImage(reader=MedicalImageReader(), image_only=True)
    work = out_dir / ".pass1"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        variants, raw_scores = _raw_pass(predictor, cases, read, work, values, decide_postprocessing)
        decision = decide(variants, values) if decide_postprocessing else None
        post = decision.postprocessing if decision else predictor.postprocessing
        rows, predictions, pictures = _final_pass(cases, read, work, post, labels, out_dir, save_predictions,
                                                  surface_tolerance_mm, qc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    extra: dict[str, Any] = {"postprocessing": post.to_dict(), "postprocessing_applied": post.describe(labels),
                             "mean_dice_without_postprocessing": nanmean(
                                 [nanmean([r[v] for r in raw_scores]) for v in values]),
                             "surface_tolerance_mm": surface_tolerance_mm}
    if decision is not None:
        extra["postprocessing_decision"] = {"mean_dice": decision.mean_dice, "label_dice": {
            variant: {labels[v]: d for v, d in per_label.items()} for variant, per_label in decision.label_dice.items()}}
    summary = write_evaluation(rows, list(labels.values()), out_dir, extra, metrics=SURFACE_METRICS)
    return EvaluationResult(summary, rows, post, decision, predictions, pictures)


def validate_and_export(
    settings: Any, device: Any, plan: dict[str, Any], val_cases: Sequence[Case], chosen: Path, out_dir: Path,
    decide_postprocessing: bool = True, surface_tolerance_mm: float = 1.0, qc: bool = True,
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

    Returns:
        The evaluation, the exported model's path and its ``inference`` section.
    """
    import dataclasses

    from pipeline.inference import LoadedModel, inference_section, load_checkpoint, load_model_from_checkpoint, save_checkpoint

    state = load_checkpoint(chosen)
    model: LoadedModel = load_model_from_checkpoint(state, device)
    model.settings = settings
    evaluation = evaluate_cases(Predictor([model], device), val_cases, out_dir,
                                decide_postprocessing=decide_postprocessing, surface_tolerance_mm=surface_tolerance_mm,
                                qc=qc)
    validated = dataclasses.replace(settings, postprocessing=evaluation.postprocessing)
    section = inference_section(validated, plan, validated=True)
    model_path = chosen.with_name("model.pt")
    save_checkpoint({k: state[k] for k in ("model", "plan", "patch_size", "state_dict")}
                    | {"inference": section, "epoch": state.get("epoch"), "source_checkpoint": chosen.name}, model_path)
    return evaluation, model_path, section
