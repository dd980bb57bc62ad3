"""What a prediction reports about itself: the case record (``CASE.json``), the review flag, ``summary.csv``.

A case is flagged for review when any label's estimated Dice is below the model's
``min_expected_dice`` (fitted on validation, or set), when a label that every validation
case had was not found, or when the input does not conform to the training data; every
flag carries its reasons.

An input that does not conform gets no estimated Dice at all: the calibration was fitted on
validation cases like the training data, and applied to anything else it extrapolates (a
brain T1 post-contrast series through a hippocampus model was estimated at Dice 1.0). The
record says so in ``estimate_withheld``, and the reasons start with it.

How far the model's estimate can be trusted at all travels in ``estimate_quality``: how it
ranked validation cases it had not seen (Spearman's rho), on how many, and whether it met
the bar of :meth:`~pipeline.quality.calibration.Calibration.reliable` (``None``: a model
calibrated before that was checked). The flag does not change with it; the report and
``summary.csv`` say it, so a number from an unreliable estimate is not read as a measurement.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import Staged, save_file, write_text_atomic
from pipeline.quality.calibration import ALWAYS_PRESENT, Calibration
from pipeline.quality.conformity import Conformity
from pipeline.quality.measurements import label_volumes, spacing_mm, voxel_volume_ml

#: why a non-conforming input has no estimated Dice (``estimate_withheld`` in its record).
WITHHELD = "the input is unlike the training data, so an estimate would be an extrapolation"


def _clean(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def estimate_withheld(conformity: Conformity, calibration: Calibration | None) -> str | None:
    """Why the case gets no estimated Dice although the model has a calibration (``None``: it gets one).

    Args:
        conformity: the input check.
        calibration: the model's calibration.
    """
    return WITHHELD if calibration is not None and conformity.checked and not conformity.conforms else None


def estimate_quality(calibration: Calibration | None) -> dict[str, Any] | None:
    """How well the model's estimate ranked unseen validation cases (``None``: no calibration).

    Args:
        calibration: the model's calibration.

    Returns:
        ``rho`` (out of sample; ``None``: unknown), ``cases`` (validation cases), ``reliable``
        (``None``: not assessed) and ``why_not`` (the failed criteria, empty when reliable or not assessed).
    """
    if calibration is None:
        return None
    cases = calibration.validation.get("cases")
    return {"rho": _clean(calibration.rho), "cases": None if cases is None else int(cases),
            "reliable": calibration.reliable, "why_not": calibration.shortcomings()}


def below(estimate: float, threshold: float) -> str:
    """``"E is below T"`` with as many decimals as it takes for the two numbers to read differently.

    Two decimals suffice mostly, but an estimate of 0.8704 against a threshold of 0.8712 would
    read "0.87 is below 0.87".

    Args:
        estimate: the estimated Dice (below ``threshold``).
        threshold: the review threshold.
    """
    for digits in range(2, 7):
        a, b = f"{estimate:.{digits}f}", f"{threshold:.{digits}f}"
        if a != b:
            return f"{a} is below {b}"
    return f"{estimate!r} is below {threshold!r}"


def review(
    estimates: Mapping[str, float | None], conformity: Conformity, calibration: Calibration | None,
    min_expected_dice: float | None, presence: Mapping[str, float] | None = None,
    voxels: Mapping[str, int] | None = None,
) -> list[str]:
    """Every reason to review a case (none: it need not be looked at first).

    Args:
        estimates: label name -> estimated Dice (``None``: no estimate).
        conformity: the input check.
        calibration: the model's calibration (``None``: no estimate-based reasons).
        min_expected_dice: the threshold (``None``: the calibration's).
        presence: label name -> share of validation cases holding it.
        voxels: label name -> voxels predicted (0: the structure was not found).
    """
    reasons = []
    if (withheld := estimate_withheld(conformity, calibration)) is not None:
        reasons.append(f"no estimated Dice: {withheld}")
    if calibration is not None:
        threshold = calibration.min_expected_dice if min_expected_dice is None else min_expected_dice
        for name, estimate in estimates.items():
            if (voxels or {}).get(name) == 0 and (presence or {}).get(name, 0.0) >= ALWAYS_PRESENT:
                reasons.append(f"no {name} found, though every validation case had one")
            elif estimate is not None and estimate < threshold:
                reasons.append(f"estimated Dice of {name} {below(estimate, threshold)}")
    return reasons + list(conformity.reasons)


def case_record(
    name: str, labels: np.ndarray, affine: np.ndarray, label_names: Mapping[int, str],
    signals: Mapping[int, Mapping[str, float]] | None, calibration: Calibration | None, conformity: Conformity,
    model: Mapping[str, str], settings: Mapping[str, Any], files: Mapping[str, str | None],
    min_expected_dice: float | None = None,
) -> dict[str, Any]:
    """One case's record: measurements, estimated Dice, input check, flag and reasons, model and settings.

    Args:
        name: the case's name.
        labels: the final label map on the input's grid.
        affine: its 4x4 RAS affine (mm).
        label_names: label value -> name (background included or not).
        signals: label value -> quality signals (``None``: not computed).
        calibration: the model's calibration (``None``: no estimates).
        conformity: the input check.
        model: ``name`` and ``version`` of the model.
        settings: the inference settings used.
        files: output kind (``mask``, ``seg``, ``sr``) -> file name beside the record.
        min_expected_dice: the review threshold (``None``: the calibration's).
    """
    volumes = label_volumes(labels, affine, label_names)
    estimates: dict[str, float | None] = {n: None for n in volumes}
    withheld = estimate_withheld(conformity, calibration)
    if calibration is not None and signals is not None and withheld is None:
        by_value = calibration.estimate(signals)
        estimates = {n: _clean(by_value.get(v["value"])) for n, v in volumes.items()}
    presence = {n: calibration.labels[v["value"]].presence for n, v in volumes.items()
                if calibration is not None and v["value"] in calibration.labels}
    reasons = review(estimates, conformity, calibration, min_expected_dice, presence,
                     {n: v["voxels"] for n, v in volumes.items()})
    known = [e for e in estimates.values() if e is not None]
    return {
        "case": name,
        "model": {"name": str(model.get("name", "")), "version": str(model.get("version", ""))},
        "settings": dict(settings),
        "spacing_mm": spacing_mm(affine),
        "shape": [int(s) for s in labels.shape],
        "voxel_volume_ml": voxel_volume_ml(affine),
        "labels": {n: {**v, "estimated_dice": estimates[n],
                       "signals": {k: _clean(x) for k, x in (signals or {}).get(v["value"], {}).items()}}
                   for n, v in volumes.items()},
        "estimated_mean_dice": float(np.mean(known)) if known and len(known) == len(estimates) else None,
        "estimate_withheld": withheld,
        "estimate_quality": estimate_quality(calibration),
        "min_expected_dice": (calibration.min_expected_dice if min_expected_dice is None else min_expected_dice)
        if calibration is not None else None,
        "conformity": conformity.to_dict(),
        "flagged": bool(reasons),
        "reasons": reasons,
        "files": dict(files),
    }


def add_true_dice(record: dict[str, Any], dice: Mapping[str, float]) -> dict[str, Any]:
    """The record with each label's true Dice and their mean (evaluate).

    Args:
        record: a :func:`case_record`.
        dice: label name -> Dice (NaN: label in neither prediction nor reference).
    """
    for name, entry in record["labels"].items():
        entry["true_dice"] = _clean(dice.get(name))
    known = [d["true_dice"] for d in record["labels"].values() if d["true_dice"] is not None]
    record["true_mean_dice"] = float(np.mean(known)) if known else None
    return record


def write_record(record: Mapping[str, Any], path: Path, staged: Staged | None = None) -> Path:
    """Write a case record as JSON, atomically.

    Args:
        record: from :func:`case_record`.
        path: the target ``.json``.
        staged: write as part of these staged files (committed together); default: on its own.
    """
    text = json.dumps(record, indent=1)
    save_file(path, staged, ".json", lambda tmp: Path(tmp).write_text(text))
    return path


def read_record(path: Path) -> dict[str, Any] | None:
    """A record written by :func:`write_record` (``None`` when missing or unreadable).

    Args:
        path: the ``.json`` file.
    """
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def summary_rows(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per case for ``summary.csv`` (flagged first, then by estimated mean Dice).

    Args:
        records: case records.
    """
    rows = []
    for r in sorted(records, key=review_order):
        row: dict[str, Any] = {"case": r["case"], "flagged": "yes" if r["flagged"] else "no",
                               "estimated_mean_dice": r.get("estimated_mean_dice"),
                               "estimate_withheld": r.get("estimate_withheld")}
        quality = r.get("estimate_quality") or {}
        # Repeated per row: a batch may mix models, and a spreadsheet row is read on its own.
        row["estimate_rho"] = quality.get("rho")
        row["estimate_reliable"] = {True: "yes", False: "no"}.get(quality.get("reliable"), "")
        if "true_mean_dice" in r:
            row["true_mean_dice"] = r["true_mean_dice"]
        for name, entry in r["labels"].items():
            row[f"{name} volume_ml"] = entry["volume_ml"]
            row[f"{name} voxels"] = entry["voxels"]
            row[f"{name} estimated_dice"] = entry.get("estimated_dice")
            if "true_dice" in entry:
                row[f"{name} true_dice"] = entry["true_dice"]
        row.update({"reasons": "; ".join(r["reasons"]), "model": r["model"]["name"],
                    "model_version": r["model"]["version"], "mask": r["files"].get("mask")})
        rows.append(row)
    return rows


def review_order(record: Mapping[str, Any]) -> tuple:
    """Sort key of the review: flagged first, then the lowest estimated mean Dice; cases without an
    estimate after those with one, then by name (``summary.csv`` and ``report.html`` share it).

    Args:
        record: a case record.
    """
    estimate = record.get("estimated_mean_dice")
    missing = estimate is None or (isinstance(estimate, float) and math.isnan(estimate))
    return (not record.get("flagged"), missing, 0.0 if missing else float(estimate), str(record.get("case", "")))


def write_summary_csv(records: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Write ``summary.csv``: one row per case, opens in a spreadsheet (empty cells for no value).

    Args:
        records: case records.
        path: the target file.
    """
    rows = summary_rows(records)
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    write_text_atomic(path, buffer.getvalue())
    return path
