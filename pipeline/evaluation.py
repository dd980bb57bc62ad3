"""The evaluate stage: Dice per label against reference labels, on the input's own grid."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import LoadImage
from tqdm import tqdm

from pipeline.dataset import Case
from pipeline.errors import InputDataError
from pipeline.inference import Predictor
from pipeline.metrics import dice_per_label, write_evaluation
from transforms.readers import MedicalImageReader


def evaluate_cases(predictor: Predictor, cases: Sequence[Case], out_dir: Path) -> dict[str, Any]:
    """Segment each case, score it against its label, and write ``cases.csv`` and ``summary.json``.

    Dice is NaN for a label absent from both prediction and reference, and such
    cases are left out of that label's mean (as nnU-Net does).

    Args:
        predictor: the model(s) to evaluate.
        cases: labelled cases.
        out_dir: the output folder (created).

    Returns:
        The summary: ``mean_dice``, ``dice_per_label`` (by label name) and ``num_cases``.
    """
    known = sorted(predictor.models[0].labels)
    labels = {v: n for v, n in predictor.models[0].labels.items() if v != 0}
    read_label = LoadImage(reader=MedicalImageReader(), image_only=True)
    rows = []
    for case in tqdm(cases, desc="evaluate", unit="case", leave=False):
        if case.label is None:
            raise InputDataError(case.images[0], "has no label to evaluate against")
        label = read_label(str(case.label))  # read first: a bad label file fails before the costly prediction
        truth = np.asarray(label).astype(np.int64)
        # A value the model cannot predict would be silently scored as background everywhere.
        unknown = sorted(set(np.unique(truth).tolist()) - set(known))
        if unknown:
            raise InputDataError(case.label, f"holds label value(s) {unknown} that the model does not predict "
                                             f"(its labels: {known})")
        pred, affine = predictor(case.images)
        if truth.shape != pred.shape:
            raise InputDataError(case.label, f"label shape {truth.shape} differs from its image's {pred.shape}")
        # Same shape is not enough: a label on a shifted/rotated grid would be scored voxel by voxel against
        # the wrong anatomy. Same tolerance as the preprocess stage's image/label check.
        if not np.allclose(np.asarray(label.affine, dtype=np.float64), affine, atol=1e-3):
            raise InputDataError(case.label, "label affine (orientation/spacing/origin) differs from the image's")
        scores = dice_per_label(pred, truth, list(labels))
        rows.append({"case": case.case_id, **{labels[v]: d for v, d in scores.items()}})
    return write_evaluation(rows, list(labels.values()), out_dir)
