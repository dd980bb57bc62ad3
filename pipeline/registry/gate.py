"""The champion gate: the candidate and the current champion scored in one call, on the same cases.

Each model predicts with its own stored inference settings (mirroring, overlap,
postprocessing), so each is judged as it would be used. ``champion`` moves only when
the candidate's mean Dice beats the champion's by more than ``registry.promote_margin``.
Scoring the champion can fail (a model from an incompatible version, a download
error): then the gate says so and nothing moves; an error never moves or removes
``champion``.

Race-free: :func:`gated_registration` runs champion lookup -> scoring -> decision ->
registration -> aliases while holding the registered model's gate lease
(:mod:`pipeline.registry.lease`), so candidates gated at the same moment end as if
gated one after the other: the second is compared with the first's outcome.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.data import Case
from pipeline.errors import user_error
from pipeline.evaluation import EvaluationResult
from pipeline.registry import model_cache

if TYPE_CHECKING:
    from pipeline.registry.lease import GateLease
    from pipeline.registry.registration import Promotion

Call = Callable[[Callable[[], Any], str], Any]


@dataclass
class GateResult:
    """The comparison and its decision.

    Args:
        promoted: whether the candidate takes ``champion``.
        decision: the decision in words (for tags, the summary and the description).
        candidate: the candidate's ``mean_dice`` and ``dice_per_label`` on the gate's cases.
        champion: the champion's, when it was scored.
        champion_version: the champion's registry version, if there is one.
        margin: ``registry.promote_margin``.
        rows: per case: the case pseudonym, then ``candidate <label>`` and ``champion <label>`` Dice.
        columns: the table's columns.
    """

    promoted: bool
    decision: str
    candidate: dict[str, Any]
    champion: dict[str, Any] | None = None
    champion_version: str | None = None
    margin: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)

    @property
    def delta(self) -> float | None:
        """Candidate minus champion mean Dice (``None`` without a scored champion)."""
        if self.champion is None:
            return None
        return float(self.candidate["mean_dice"]) - float(self.champion["mean_dice"])


def _scores(result: EvaluationResult) -> dict[str, Any]:
    return {"mean_dice": result.summary["mean_dice"], "dice_per_label": dict(result.summary["dice_per_label"])}


def compare(
    candidate: EvaluationResult,
    score_champion: Callable[[Path], EvaluationResult] | None,
    champion_version: str | None,
    margin: float,
    alias: Callable[[str], str],
    label_names: Sequence[str],
) -> GateResult:
    """Score the champion on the candidate's cases and decide.

    Args:
        candidate: the candidate's evaluation on the gate's cases.
        score_champion: evaluates the champion on the same cases into the given folder
            (``None``: there is no champion).
        champion_version: the champion's version.
        margin: the Dice margin the candidate must exceed.
        alias: case id -> pseudonym (for the table).
        label_names: foreground label names in column order.
    """
    cand = _scores(candidate)
    columns = ["case", *[f"candidate {n}" for n in label_names], *[f"champion {n}" for n in label_names]]
    base_rows = {r["case"]: {"case": alias(r["case"]), **{f"candidate {n}": r[n] for n in label_names}}
                 for r in candidate.rows}
    if score_champion is None:
        return GateResult(True, "promoted: there was no champion", cand, margin=margin,
                          rows=list(base_rows.values()), columns=columns)
    try:
        with tempfile.TemporaryDirectory(prefix="unet-gate-") as tmp:
            champion = score_champion(Path(tmp))
    except Exception as error:  # any failure: the champion stays
        cause = user_error(error)
        why = str(cause) if cause is not None else f"{type(error).__name__}"
        return GateResult(False, f"not promoted: champion version {champion_version} could not be scored ({why[:200]})",
                          cand, None, champion_version, margin, list(base_rows.values()), columns)
    champ = _scores(champion)
    for r in champion.rows:
        base_rows[r["case"]].update({f"champion {n}": r[n] for n in label_names})
    delta = float(cand["mean_dice"]) - float(champ["mean_dice"])
    if math.isnan(delta):
        promoted, decision = False, "not promoted: a mean Dice is undefined (NaN)"
    elif delta > margin:
        promoted = True
        decision = (f"promoted: mean Dice {cand['mean_dice']:.4f} beats champion version {champion_version}'s "
                    f"{champ['mean_dice']:.4f} by {delta:+.4f} (margin {margin:g})")
    else:
        promoted = False
        decision = (f"not promoted: mean Dice {cand['mean_dice']:.4f} vs champion version {champion_version}'s "
                    f"{champ['mean_dice']:.4f} ({delta:+.4f}, margin {margin:g}); champion stays version {champion_version}")
    return GateResult(promoted, decision, cand, champ, champion_version, margin, list(base_rows.values()), columns)


def metrics(result: GateResult, metric_name: Callable[[str], str]) -> dict[str, float]:
    """The comparison as MLflow metrics (``gate.*``).

    Args:
        result: the gate's result.
        metric_name: label name -> a name MLflow accepts.
    """
    out = {"gate.candidate_mean_dice": float(result.candidate["mean_dice"]), "gate.margin": result.margin,
           "gate.promoted": 1.0 if result.promoted else 0.0, "gate.num_cases": float(len(result.rows))}
    out.update({f"gate.candidate_dice_{metric_name(n)}": float(v) for n, v in result.candidate["dice_per_label"].items()})
    if result.champion is not None:
        out["gate.champion_mean_dice"] = float(result.champion["mean_dice"])
        out["gate.delta"] = float(result.delta or 0.0)
        out.update({f"gate.champion_dice_{metric_name(n)}": float(v)
                    for n, v in result.champion["dice_per_label"].items()})
    return out


def tags(result: GateResult, eval_set: str) -> dict[str, str]:
    """The comparison as tags on the model version (``gate.*``).

    Args:
        result: the gate's result.
        eval_set: which cases were scored, in words.
    """
    out = {"gate.decision": result.decision, "gate.margin": f"{result.margin:g}", "gate.eval_set": eval_set,
           "gate.num_cases": str(len(result.rows)), "gate.candidate_mean_dice": f"{result.candidate['mean_dice']:.4f}"}
    if result.champion_version is not None:
        out["gate.champion_version"] = result.champion_version
    if result.champion is not None:
        out["gate.champion_mean_dice"] = f"{result.champion['mean_dice']:.4f}"
    return out


def eval_cases(evaluation_set: str | None, validation: Sequence[Case]) -> tuple[list[Case], str]:
    """The gate's cases and how to name them: the configured fixed set, else the validation fold.

    Args:
        evaluation_set: ``registry.evaluation_set`` (a dataset path) or ``None``.
        validation: the candidate's validation cases.
    """
    if evaluation_set is None:
        return list(validation), f"validation fold ({len(validation)} cases)"
    from pipeline.data import load_dataset

    dataset = load_dataset(evaluation_set)
    return list(dataset.cases), f"fixed evaluation set '{dataset.name}' ({len(dataset.cases)} cases)"


def score_and_log(
    evaluation_set: str | None, promote_margin: float, model_name: str, device: Any, work_dir: Path,
    val_cases: Sequence[Case], evaluation: EvaluationResult, model_path: Path, log: Any,
    evaluated_on_set: bool = False, cache_max_gb: float | None = model_cache.DEFAULT_MAX_GB,
) -> tuple[GateResult, str]:
    """Score the candidate and the champion on the same cases, in this call; log the comparison.

    Args:
        evaluation_set: ``registry.evaluation_set`` (a fixed labelled dataset) or ``None`` (the validation fold).
        promote_margin: ``registry.promote_margin``.
        model_name: the registered model's name.
        device: where the models run.
        work_dir: the work directory (its model store, when no tracking URI is set; the champion's
            and a fixed set's candidate predictions go to temporary folders of their own, so parallel
            fold jobs on one work directory never share them).
        val_cases: the candidate's validation cases.
        evaluation: the candidate's validation result.
        model_path: the candidate's exported ``model.pt``.
        log: the run's :class:`~pipeline.registry.tracking.RunLogger`.
        evaluated_on_set: ``evaluation`` is already the candidate's on ``evaluation_set`` (a fold
            ensemble, which has no validation fold of its own): it is not scored a second time.
        cache_max_gb: ``registry.model_cache_max_gb`` (the champion is fetched through the model cache).

    Returns:
        The gate's result and its cases in words.
    """
    import mlflow

    from pipeline import registry
    from pipeline.evaluation import csv_text, evaluate_cases
    from pipeline.inference import Predictor, load_models
    from pipeline.registry.tracking import metric_name

    cases, eval_set = eval_cases(evaluation_set, val_cases)
    names = list(evaluation.summary["dice_per_label"])
    candidate = evaluation
    if evaluation_set is not None and not evaluated_on_set:
        # A fixed set: the candidate as it will be used (its decided postprocessing) on those cases.
        with tempfile.TemporaryDirectory(prefix="unet-gate-candidate-") as tmp:
            candidate = evaluate_cases(Predictor(load_models(model_path, device), device), cases,
                                       Path(tmp), save_predictions=False, report=False)

    def score_champion(champion_version: str, tmp: Path) -> EvaluationResult:
        resolved = log.call(lambda: registry.resolve_model(f"models:/{model_name}/{champion_version}", work_dir,
                                                           tmp / "model", log.uri, cache_max_gb),
                            "downloading the champion")
        try:
            predictor = Predictor(load_models(resolved.path, device), device)  # a fold ensemble: all its folds
        finally:
            model_cache.release(resolved.path)  # loaded: the cache may evict its copy again
        return evaluate_cases(predictor, cases, tmp / "evaluation", save_predictions=False, report=False)

    result = judge(model_name, candidate, score_champion, promote_margin, log.alias, names, log.call)
    log.metrics(metrics(result, metric_name), "logging the gate")
    log.call(lambda: mlflow.log_text(csv_text(result.rows, result.columns), "gate/comparison.csv"),
             "logging the gate table")
    log.tags({"gate.decision": result.decision, "gate.eval_set": eval_set})
    return result, eval_set


def judge(model_name: str, candidate: EvaluationResult, score_version: Callable[[str, Path], EvaluationResult],
          margin: float, alias: Callable[[str], str], label_names: Sequence[str], call: Call | None = None) -> GateResult:
    """Look up the champion now, score it on the candidate's cases and decide (run it holding the gate lease).

    Args:
        model_name: the registered model's name.
        candidate: the candidate's evaluation on the gate's cases.
        score_version: (champion version, a temporary folder) -> its evaluation on the same cases.
        margin: ``registry.promote_margin``.
        alias: case id -> pseudonym (for the table).
        label_names: foreground label names in column order.
        call: runs one registry call (``RunLogger.call``: waits out an outage); default: directly.
    """
    from pipeline.registry.registration import champion_version as lookup

    call = call or (lambda action, what: action())
    version = call(lambda: lookup(model_name), "looking up the champion")
    score = (lambda tmp: score_version(version, tmp)) if version else None
    return compare(candidate, score, version, margin, alias, label_names)


def gated_registration(
    model_name: str, lease: GateLease | None, gate: Callable[[], tuple[GateResult, str]],
    register: Callable[[], str | None], describe: Callable[[str, GateResult, str], None], call: Call | None = None,
) -> tuple[GateResult, str, Promotion | None]:
    """The gate's critical section, holding the registered model's lease: gate, register, describe, set aliases.

    Lookup, scoring, decision, registration and aliases all run under the lease, so a
    second candidate gated at the same moment waits and is then compared with the
    first's outcome; the lease is checked once more right before an alias moves.

    Args:
        model_name: the registered model's name.
        lease: the model's :class:`~pipeline.registry.lease.GateLease`; ``None`` gates without one
            (only for a test that shows the race it prevents).
        gate: looks up and scores the champion, decides, logs (e.g. :func:`score_and_log`).
        register: registers the candidate; returns its version (``None``: not registered).
        describe: (version, gate result, its cases in words) -> writes the version's description and tags.
        call: runs one registry call (``RunLogger.call``: waits out an outage); default: directly.

    Returns:
        The gate's result, its cases in words, and the promotion (``None`` when nothing was registered).

    Raises:
        GateLeaseError: the lease was not obtained in time, or was lost before the aliases moved.
    """
    from pipeline.registry.registration import set_aliases

    call = call or (lambda action, what: action())
    with lease if lease is not None else nullcontext():
        result, eval_set = gate()
        version = register()
        if version is None:
            return result, eval_set, None
        describe(version, result, eval_set)
        if lease is not None:
            lease.check()
        promotion = call(lambda: set_aliases(model_name, version, result.promoted, result.champion_version,
                                             result.decision), "setting the aliases")
    return result, eval_set, promotion
