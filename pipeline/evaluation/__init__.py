"""Evaluation: Dice, HD95 and surface Dice against reference labels, the postprocessing choice, QC pictures.

Scores a model's predictions on labelled cases (the evaluate stage and the validation
that decides postprocessing before a model is exported), and draws the pictures a
reviewer looks at. It may import ``pipeline.inference`` and ``pipeline.data``, never
training, registry, scheduling or pacs.
"""

from pipeline.evaluation.evaluate import SURFACE_METRICS, EvaluationResult, evaluate_cases, validate_and_export
from pipeline.evaluation.metrics import case_columns, csv_text, dice_per_label, nanmean, write_evaluation
from pipeline.evaluation.qc_pictures import training_curves

__all__ = [
    "SURFACE_METRICS",
    "EvaluationResult",
    "case_columns",
    "csv_text",
    "dice_per_label",
    "evaluate_cases",
    "nanmean",
    "training_curves",
    "validate_and_export",
    "write_evaluation",
]
