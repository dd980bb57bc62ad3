"""The quality side of an evaluation: case records with estimated and true Dice, the report, the calibration.

On validation (``run``) the map from quality signals to Dice is fitted here and drawn
(out-of-sample estimated against true Dice per label, with Spearman's rho); on any other evaluation
the model's stored calibration is applied, so the report shows how well the estimate
held on those cases.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import write_text_atomic
from pipeline.quality import (
    SIGNALS,
    WORST_CASES,
    Calibration,
    Conformity,
    add_true_dice,
    case_record,
    out_of_sample_estimates,
    write_report,
    write_summary_csv,
)

#: an evaluation's case records with their signals and true Dice, for comparing signals afterwards
#: (``scripts/quality_features.py``): ``quality.csv`` keeps neither the signals nor their names.
RECORDS_FILE = "quality_records.json"


@dataclass
class CaseQuality:
    """What pass 1 of an evaluation keeps of one case for the quality review.

    Args:
        signals: label value -> quality signals.
        conformity: the input check.
    """

    signals: dict[int, dict[str, float]]
    conformity: Conformity


def calibration_plot(
    calibration: Calibration, signals: Sequence[Mapping[int, Mapping[str, float]]],
    true_dice: Sequence[Mapping[int, float]], labels: Mapping[int, str], out_png: Path,
) -> Path:
    """Out-of-sample estimated against true Dice on the validation cases, one panel per label and one for the case mean.

    Each case is drawn at the estimate of a fit that did not see it (leave one out), as the
    threshold and the figures were computed: drawn in-sample, the points would hug the
    diagonal more closely than any unseen case will. The diagonal is a perfect estimate; the
    title gives the out-of-sample Spearman rho, how many of the worst cases the review
    threshold (dashed) catches, the share it flags, and whether that makes the estimate reliable.

    Args:
        calibration: the fitted calibration.
        signals: per case, label value -> signals.
        true_dice: per case, label value -> Dice.
        labels: foreground label value -> name.
        out_png: the picture to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = list(labels)
    est = np.array([[_nan(e.get(v)) for v in values] for e in out_of_sample_estimates(signals, true_dice)], dtype=float)
    true = np.array([[_nan(t.get(v)) for v in values] for t in true_dice], dtype=float)
    panels = [(labels[v], est[:, j], true[:, j]) for j, v in enumerate(values) if v in calibration.labels]
    with warnings.catch_warnings():  # cases without any estimate are NaN rows, left out of the plot
        warnings.simplefilter("ignore", RuntimeWarning)
        panels.append(("mean", np.nanmean(est, axis=1), np.nanmean(true, axis=1)))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, x, y) in zip(axes[0], panels):
        ax.scatter(x, y, s=14, alpha=0.75)
        shown = np.concatenate([x[~np.isnan(x)], y[~np.isnan(y)], [calibration.min_expected_dice]])
        lo = float(shown.min()) - 0.02
        ax.plot([lo, 1], [lo, 1], color="grey", lw=1, label="estimate = true (the fitted map)")
        ax.axvline(calibration.min_expected_dice, color="tab:red", ls="--", lw=1, label="review threshold")
        ax.set(title=name, xlabel="estimated Dice", ylabel="true Dice", xlim=(lo, 1), ylim=(lo, 1))
    fig.suptitle(_plot_title(calibration), fontsize=10)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def _plot_title(calibration: Calibration) -> str:
    """The calibration plot's title: out-of-sample figures, and the verdict they give."""
    v = calibration.validation
    title = f"Quality estimate on {int(v.get('cases', 0))} validation cases, out of sample: Spearman rho {calibration.rho:.2f}"
    if calibration.reliable is None:  # a calibration stored before the out-of-sample figures
        return f"{title}, reliability not assessed"
    worst = min(WORST_CASES, int(v.get("cases", WORST_CASES)))
    verdict = "reliable" if calibration.reliable else "NOT reliable: " + "; ".join(calibration.shortcomings())
    return (f"{title}, worst {worst} caught {v['worst5_caught']:.0f}/{worst}, flagged {v['flagged_share']:.0%}\n"
            f"{verdict}")


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def quality_records(
    case_ids: Sequence[str], finals: Sequence[np.ndarray], affines: Sequence[np.ndarray], quality: Sequence[CaseQuality],
    true_dice: Sequence[Mapping[int, float]], labels: Mapping[int, str], calibration: Calibration | None,
    model: Mapping[str, str], settings: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """One record per evaluated case, with the true Dice beside the estimate.

    Args:
        case_ids: the cases.
        finals: their final label maps.
        affines: their affines.
        quality: what pass 1 kept.
        true_dice: label value -> Dice of each final prediction.
        labels: foreground label value -> name.
        calibration: the calibration to estimate with.
        model: ``name`` and ``version``.
        settings: the inference settings used.
    """
    records = []
    for case_id, final, affine, q, dice in zip(case_ids, finals, affines, quality, true_dice):
        record = case_record(case_id, final, affine, labels, q.signals, calibration, q.conformity, model, settings,
                             {"mask": f"predictions/{case_id}.nii.gz"})
        records.append(add_true_dice(record, {labels[v]: d for v, d in dice.items()}))
    return records


def write_quality_outputs(records: Sequence[Mapping[str, Any]], thumbnails: Mapping[str, bytes], out_dir: Path,
                          title: str) -> tuple[Path, Path]:
    """``quality.csv`` (one row per case) and ``report.html`` of an evaluation.

    Args:
        records: the case records.
        thumbnails: case -> PNG.
        out_dir: the evaluation folder.
        title: the report's title.
    """
    return (write_summary_csv(records, out_dir / "quality.csv"),
            write_report(records, out_dir / "report.html", thumbnails, title))


def write_quality_records(records: Sequence[Mapping[str, Any]], out_dir: Path) -> Path:
    """:data:`RECORDS_FILE`: the signal names this version computes and every case record (signals, true Dice).

    Kept in the work directory only (case ids in it, as in ``quality.csv``); not logged to MLflow.

    Args:
        records: the case records of an evaluation (:func:`quality_records`).
        out_dir: the evaluation folder.
    """
    path = out_dir / RECORDS_FILE
    write_text_atomic(path, json.dumps({"signals": list(SIGNALS), "records": list(records)}, indent=1))
    return path
