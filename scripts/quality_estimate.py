"""How well does each quality estimate rank cases it never saw? Today's linear map and the agreement map, cross-fitted.

Each path given is one split (a work directory trained with one ``data.split_seed``; an
evaluation folder or a ``quality_records.json`` also do). Every ``quality_records.json`` under
it is one fold: the validation cases of the model trained on the other folds, with every case's
signals (``agreement`` among them) and true Dice. The estimates are cross-fitted by fold: each
fold's cases are estimated by a map fitted on the other folds' cases, with its review threshold
chosen on those (leave one out inside them, as ``run`` chooses it). A split with a single fold is
cross-fitted leave-one-out. No case is ever estimated, thresholded or scored by a fit that saw it
(:func:`pipeline.quality.validation.cross_fit` refuses a case id in both; so two split seeds are
given as two paths, never pooled as folds).

Per split and estimator it prints: Spearman's rho of the estimated against the true mean Dice with
its bootstrap 95 % interval, the median of the per-structure rhos (every structure's interval in
``--json``), AURC against a random order's and against the other estimator's on the same cases,
the share of cases flagged (estimate below the threshold, or a gross-failure rule: the input check,
an expected structure missing, a volume far from the training volumes, a structure in pieces) and
how many of the worst cases that catches, and the verdict of
:func:`pipeline.quality.validation.reliable`. ``agreement (raw)`` and ``agreement_members (raw)`` rank by the
mean agreement itself, no map and no flag: what the map starts from.

Usage (the full run: every fold of a task, two split seeds; see docs/quality.md)::

    python scripts/quality_estimate.py unet-work/hippo-s0 unet-work/hippo-s1 [--json figures.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.quality import fit_calibration  # noqa: E402
from pipeline.quality.validation import (  # noqa: E402
    RESAMPLES,
    WORST_K,
    cross_fit,
    per_structure,
    reliable,
    summarise,
)
from scripts.quality_features import record_files  # noqa: E402

#: the estimators compared: row name -> (fit_calibration's estimator, its features).
ESTIMATORS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "today (linear)": ("linear", None),
    "agreement (isotonic)": ("agreement", ("agreement",)),
    # An ensemble's evaluation (``unet-pipeline ensemble`` on ``registry.evaluation_set``) also has its models' masks.
    "agreement_members (isotonic)": ("agreement", ("agreement_members",)),
}
#: gross-failure rules, set a priori (never tuned on any case): a structure's volume this many robust standard
#: deviations of the training log volumes away (``volume_z``; 4 is a volume e^(4 x scale) times off) ...
VOLUME_Z_RULE = 4.0
#: ... or more than this share of it outside its largest connected piece (``fragments``).
FRAGMENTS_RULE = 0.5
COLUMNS = ("split", "estimator", "cases", "rho [95% CI]", "rho/structure (median)", "AURC", "random", "vs other",
           "flagged", "worst caught", "reliable")


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def load_split(path: Path) -> list[dict[str, Any]]:
    """Every case of one split: its fold, id, per-label signals and true Dice, and the rules' reasons.

    Args:
        path: a work directory (every ``quality_records.json`` below it is one fold), an evaluation folder, or a file.

    Raises:
        FileNotFoundError: no records under ``path``.
    """
    files, notes = record_files([path])
    if not files:
        raise FileNotFoundError("; ".join(notes))
    cases = []
    for fold, file in enumerate(files):
        for record in json.loads(file.read_text())["records"]:
            labels = record["labels"]
            conformity = record.get("conformity") or {}
            rules = ([f"input: {r}" for r in conformity.get("reasons", [])]
                     if conformity.get("checked") and not conformity.get("conforms", True) else [])
            rules += gross_failures(labels)
            cases.append({
                "fold": fold, "folder": str(file.parent), "case": str(record["case"]),
                "names": {int(e["value"]): name for name, e in labels.items()},
                "signals": {int(e["value"]): {k: _number(v) for k, v in (e.get("signals") or {}).items()}
                            for e in labels.values()},
                "truth": {int(e["value"]): _number(e.get("true_dice")) for e in labels.values()},
                "rules": rules,
            })
    return cases


def gross_failures(labels: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The structure rules' reasons for one case record's labels (the input check is the record's own).

    Args:
        labels: a case record's ``labels`` (name -> ``signals``).
    """
    why = []
    for name, entry in labels.items():
        signals = entry.get("signals") or {}
        if _number(signals.get("volume_z")) > VOLUME_Z_RULE:
            why.append(f"{name}: volume {_number(signals.get('volume_z')):.1f} robust SDs from the training volumes")
        if _number(signals.get("fragments")) > FRAGMENTS_RULE:
            why.append(f"{name}: {100 * _number(signals.get('fragments')):.0f}% outside its largest piece")
    return why


def _mean(values: Sequence[float]) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values)) if len(values) else math.nan


def cross_fitted(cases: Sequence[Mapping[str, Any]], estimator: str, features: tuple[str, ...] | None,
                 flag_quantile: float) -> list[dict[str, Any]]:
    """Per case, its per-label estimates and flag from a map (and threshold) fitted on the other folds' cases.

    Args:
        cases: from :func:`load_split`.
        estimator: ``linear`` or ``agreement`` (:func:`pipeline.quality.fit_calibration`).
        features: the signals it reads (``None``: its default).
        flag_quantile: the share of the fit's cases its threshold flags (``qc.flag_quantile``).
    """
    folds = [c["fold"] for c in cases]
    groups = folds if len(set(folds)) > 1 else list(range(len(cases)))  # one fold: leave one out

    def fit(rows: list[int]) -> Any:
        return fit_calibration([cases[i]["signals"] for i in rows], [cases[i]["truth"] for i in rows],
                               flag_quantile=flag_quantile, features=features, estimator=estimator)

    def score(calibration: Any, rows: list[int]) -> list[dict[str, Any]]:
        out = []
        for i in rows:
            estimates = calibration.estimate(cases[i]["signals"])
            below = [v for v, e in estimates.items() if e is not None and e < calibration.min_expected_dice]
            out.append({"estimates": estimates, "flagged": bool(below or cases[i]["rules"])})
        return out

    ids = [(c["case"]) for c in cases]
    return cross_fit(groups, fit, score, case_ids=ids)


def evaluate_split(cases: Sequence[Mapping[str, Any]], flag_quantile: float, resamples: int = RESAMPLES,
                   worst: int = WORST_K) -> dict[str, Any]:
    """Every estimator's out-of-sample figures on one split.

    Args:
        cases: from :func:`load_split`.
        flag_quantile: the share of the fit's cases a threshold flags.
        resamples: bootstrap resamples.
        worst: how many of the worst cases the flag is checked against.

    Returns:
        estimator name -> its summary (:func:`pipeline.quality.validation.summarise`), ``reliable``, ``why_not``,
        ``structures`` (name -> rho, low, high, n) and, where it cannot be computed, ``note``.
    """
    truth = np.array([_mean([d for d in c["truth"].values() if not math.isnan(d)]) for c in cases])
    names = {v: n for c in cases for v, n in c["names"].items()}
    estimates: dict[str, np.ndarray] = {}
    per_label: dict[str, dict[int, np.ndarray]] = {}
    flags: dict[str, np.ndarray] = {}
    results: dict[str, Any] = {}
    def known(signal: str) -> bool:
        return any(not math.isnan(s.get(signal, math.nan)) for c in cases for s in c["signals"].values())

    for name, (estimator, features) in ESTIMATORS.items():
        if features == ("agreement_members",) and not known("agreement_members"):
            continue  # one model's evaluation: no members' masks to compare, nothing to say
        if estimator == "agreement" and features is not None and not known(features[0]):
            results[name] = {"note": f"no {features[0]} in these records (evaluated before it existed, or without "
                                     "mirroring)"}
            continue
        fitted = cross_fitted(cases, estimator, features, flag_quantile)
        per_label[name] = {v: np.array([_number(None if f is None else f["estimates"].get(v)) for f in fitted])
                           for v in names}
        estimates[name] = np.array([math.nan if f is None else _mean(
            [e for e in f["estimates"].values() if e is not None]) for f in fitted])
        flags[name] = np.array([False if f is None else f["flagged"] for f in fitted])
    for signal in ("agreement", "agreement_members"):
        if not known(signal):
            continue
        raw = {v: np.array([c["signals"].get(v, {}).get(signal, math.nan) for c in cases]) for v in names}
        per_label[f"{signal} (raw)"] = raw
        estimates[f"{signal} (raw)"] = np.array([_mean([raw[v][i] for v in names if not math.isnan(raw[v][i])])
                                                 for i in range(len(cases))])
    label_truth = {v: np.array([c["truth"].get(v, math.nan) for c in cases]) for v in names}
    for name, est in estimates.items():
        others = [o for o in ESTIMATORS if o in estimates and o != name]
        summary = summarise(est, truth, flags.get(name), estimates[others[0]] if others else None, resamples,
                            worst=worst)
        ok, why = reliable(summary)
        structures = per_structure({names[v]: per_label[name][v] for v in names},
                                   {names[v]: label_truth[v] for v in names}, resamples)
        results[name] = {**summary, "reliable": ok, "why_not": why, "reference": others[0] if others else None,
                         "structures": {n: {"rho": s.value, "low": s.low, "high": s.high, "n": s.n}
                                        for n, s in structures.items()}}
    return results


def _f(value: Any, digits: int = 3) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def rows(split: str, results: Mapping[str, Any]) -> list[list[str]]:
    """The table's rows of one split.

    Args:
        split: the split's path.
        results: from :func:`evaluate_split`.
    """
    out = []
    for name, r in results.items():
        if "note" in r:
            out.append([split, name, "", r["note"]])
            continue
        rhos = [s["rho"] for s in r["structures"].values() if not math.isnan(s["rho"])]
        out.append([
            split, name, f"{r['cases']:.0f}",
            f"{_f(r['spearman'], 2)} [{_f(r['spearman_low'], 2)}, {_f(r['spearman_high'], 2)}]",
            _f(float(np.median(rhos)) if rhos else math.nan, 2), _f(r["aurc"], 4), _f(r["aurc_random"], 4),
            f"{_f(r['aurc_on_reference_cases'], 4)} vs {_f(r['aurc_reference'], 4)}" if "aurc_reference" in r else "",
            f"{100 * r['flagged_share']:.0f}%" if "flagged_share" in r else "",
            f"{r['worst_caught']:.0f}/{r['worst']:.0f}" if "worst_caught" in r else "",
            "yes" if r["reliable"] else "no: " + "; ".join(r["why_not"]),
        ])
    return out


def table(lines: Sequence[Sequence[str]]) -> str:
    """Plain-text table (a note spans the figures' columns).

    Args:
        lines: from :func:`rows`.
    """
    widths = [max([len(c)] + [len(line[i]) for line in lines if i < len(line) and len(line) == len(COLUMNS)])
              for i, c in enumerate(COLUMNS)]
    text = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)).rstrip()]
    text += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    return "\n".join(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, cross-fit and score every estimator on every split, print the table.

    Args:
        argv: the command line (default: ``sys.argv[1:]``).
    """
    from pipeline.config import QcConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("splits", nargs="+", type=Path,
                        help="one path per split seed: a work directory (its folds' evaluations), or one evaluation")
    parser.add_argument("--flag-quantile", type=float, default=QcConfig().flag_quantile,
                        help="the share of the fit's cases its threshold flags (default: qc.flag_quantile's)")
    parser.add_argument("--resamples", type=int, default=RESAMPLES, help="bootstrap resamples (default %(default)s)")
    parser.add_argument("--worst", type=int, default=WORST_K, help="worst cases the flag is checked against")
    parser.add_argument("--json", type=Path, help="also write every figure (per structure too) to this file")
    args = parser.parse_args(argv)
    lines: list[list[str]] = []
    figures: dict[str, Any] = {}
    for split in args.splits:
        try:
            cases = load_split(split)
        except FileNotFoundError as error:
            print(error)
            continue
        folds = len({c["fold"] for c in cases})
        results = evaluate_split(cases, args.flag_quantile, args.resamples, args.worst)
        figures[str(split)] = {"folds": folds, "cases": len(cases), "estimators": results}
        lines += rows(f"{split} ({folds} fold{'s' if folds > 1 else ''})", results)
    if not lines:
        return 1
    print(table(lines))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
