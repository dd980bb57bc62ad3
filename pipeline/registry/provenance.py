"""What a registered version carries about itself: a Markdown description and provenance tags.

A colleague looking at a version sees what it was trained on (dataset name, number
of cases, content hash, fold), with what (config hash, package version and git
commit, the plan), how well it did (Dice, HD95 and surface Dice per label), what the
champion gate decided, and how to use it with or without this project installed. A fold
ensemble's version lists every fold's provenance (fold, run id, version, validation Dice) and
its own score on the evaluation set.
Nothing here is a path or a case id (see :mod:`pipeline.registry.privacy`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass
class Provenance:
    """The facts a version's tags and description are made of.

    Args:
        model_name: the registered model's name.
        version: its version.
        run_id: the MLflow run that produced it.
        dataset_name: the ``dataset.json`` name.
        data_hash: the dataset's content hash.
        num_cases: labelled cases in the dataset.
        fold: the cross-validation fold.
        num_folds: the number of folds.
        split_seed: the split's seed.
        num_train: training cases of the fold.
        num_val: validation cases of the fold.
        config_hash: hash of the resolved configuration.
        code: ``{"package", "git_commit", "git_dirty"}``.
        plan: the preprocessing plan.
        summary: the validation summary (Dice, HD95, surface Dice per label).
        inference: the stored inference settings (``InferenceSettings.to_dict()``).
        gate_decision: the champion gate's decision in words.
        labels: for a DICOM dataset, :func:`pipeline.data.label_summary` of its manifest; else ``None``.
    """

    model_name: str
    version: str
    run_id: str
    dataset_name: str
    data_hash: str
    num_cases: int
    fold: int
    num_folds: int
    split_seed: int
    num_train: int
    num_val: int
    config_hash: str
    code: Mapping[str, Any]
    plan: Mapping[str, Any]
    summary: Mapping[str, Any]
    inference: Mapping[str, Any]
    gate_decision: str
    labels: Mapping[str, Any] | None = None


def _x(values: Any) -> str:
    return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _code_and_plan_tags(code: Mapping[str, Any], plan: Mapping[str, Any]) -> dict[str, str]:
    net = plan.get("network", {})
    return {
        "code.package_version": str(code.get("package")), "code.git_commit": str(code.get("git_commit")),
        "code.git_dirty": str(code.get("git_dirty")),
        "plan.spacing_mm": _x(plan.get("target_spacing", [])), "plan.orientation": str(plan.get("orientation")),
        "plan.normalization": ",".join(plan.get("normalization", [])),
        "plan.patch_size": _x(net.get("patch_size", [])), "plan.features": "-".join(map(str, net.get("features", []))),
        "plan.spatial_dims": str(net.get("spatial_dims")),
    }


def _code_words(code: Mapping[str, Any]) -> str:
    commit = code.get("git_commit")
    dirty = " + local changes" if code.get("git_dirty") else ""
    return f"unet-pipeline {code.get('package')}" + (f" (git {str(commit)[:12]}{dirty})" if commit else "")


def _plan_words(plan: Mapping[str, Any]) -> str:
    net = plan.get("network", {})
    return (f"Plan: {plan.get('orientation')} at {_x(plan.get('target_spacing', []))} mm, "
            f"{', '.join(plan.get('normalization', []))} normalisation, {net.get('spatial_dims')}D U-Net "
            f"{'-'.join(map(str, net.get('features', [])))}, patch {_x(net.get('patch_size', []))}.")


def _metrics_table(s: Mapping[str, Any]) -> list[str]:
    lines = ["| label | Dice | HD95 (mm) | surface Dice |", "| --- | --- | --- | --- |"]
    for name, dice in s["dice_per_label"].items():
        hd = s.get("hd95_per_label", {}).get(name, float("nan"))
        sd = s.get("surface_dice_per_label", {}).get(name, float("nan"))
        lines.append(f"| {name} | {dice:.4f} | {hd:.2f} | {sd:.4f} |")
    lines.append(f"| **mean** | **{s['mean_dice']:.4f}** | | |")
    return lines


def _use_it(model_name: str, version: str) -> list[str]:
    return [
        "### Use it",
        "",
        "```bash",
        f"unet-pipeline predict --model models:/{model_name}/{version} SCAN_OR_DICOM_FOLDER... --out DIR",
        "```",
        "",
        "Without this project installed (the model ships its code and requirements):",
        "",
        "```python",
        "import mlflow, nibabel as nib",
        f"model = mlflow.pyfunc.load_model('models:/{model_name}/{version}')",
        "scan = nib.load('scan.nii.gz')",
        "labels = model.predict({'image': scan.get_fdata(), 'affine': scan.affine})  # on the scan's grid",
        "```",
    ]


def _label_words(labels: Mapping[str, Any] | None) -> list[str]:
    if not labels:
        return []
    return ["", f"Labels: {labels['cases']} DICOM label objects from {labels['source']} ({labels['seg']} SEG, "
                f"{labels['rtstruct']} RTSTRUCT); {labels['reader_corrections']} of them are reader corrections of "
                f"automatic output; {labels['skipped']} label(s) skipped (the run's `dataset/manifest.json` says "
                f"which and why); label set digest `{labels['digest']}`."]


def tags(p: Provenance, metric_name: Any) -> dict[str, str]:
    """Provenance tags for the model version.

    Args:
        p: the facts.
        metric_name: label name -> a tag-safe name.
    """
    out = {
        "data.name": p.dataset_name, "data.num_cases": str(p.num_cases), "data.content_sha256": p.data_hash,
        "data.fold": str(p.fold), "data.num_folds": str(p.num_folds), "data.split_seed": str(p.split_seed),
        "data.num_train": str(p.num_train), "data.num_val": str(p.num_val),
        "config.sha256": p.config_hash,
        **_code_and_plan_tags(p.code, p.plan),
        "inference.mirror": str(p.inference.get("mirror")), "inference.overlap": str(p.inference.get("overlap")),
        "inference.postprocessing": str(p.inference.get("postprocessing")),
        "val.mean_dice": f"{p.summary['mean_dice']:.4f}", "mlflow.run_id": p.run_id,
    }
    for name, value in p.summary["dice_per_label"].items():
        out[f"val.dice.{metric_name(name)}"] = f"{value:.4f}"
    if p.labels:
        out.update({"data.labels.source": str(p.labels["source"]), "data.labels.digest": str(p.labels["digest"]),
                    "data.labels.reader_corrections": str(p.labels["reader_corrections"])})
    return out


def description(p: Provenance) -> str:
    """The version's Markdown description.

    Args:
        p: the facts.
    """
    lines = [
        f"## {p.model_name} version {p.version}",
        "",
        f"Trained by {_code_words(p.code)} on **{p.dataset_name}**: {p.num_cases} labelled cases, content sha256 "
        f"`{p.data_hash[:16]}...`, fold {p.fold} of {p.num_folds} (split seed {p.split_seed}: {p.num_train} training / "
        f"{p.num_val} validation cases).",
        *_label_words(p.labels),
        "",
        f"{_plan_words(p.plan)} "
        f"Config sha256 `{p.config_hash[:16]}...` (the resolved config is the run's `config/resolved.yaml`).",
        "",
        *_metrics_table(p.summary),
    ]
    pp = p.inference.get("postprocessing") or {}
    lines += [
        "",
        f"Validated with (and used by default): mirroring {'on' if p.inference.get('mirror') else 'off'}, "
        f"overlap {p.inference.get('overlap')}, {p.inference.get('mode')} blending, keep-largest-component "
        f"{'all foreground' if pp.get('foreground') else ''}{' and ' if pp.get('foreground') and pp.get('labels') else ''}"
        f"{('labels ' + ', '.join(map(str, pp.get('labels', [])))) if pp.get('labels') else ''}"
        f"{'' if pp.get('foreground') or pp.get('labels') else 'off (did not help on validation)'}.",
        "",
        f"Champion gate: {p.gate_decision}.",
        "",
        *_use_it(p.model_name, p.version),
        "",
        f"Re-run: `unet-pipeline run CONFIG --fold {p.fold}` with the config of run `{p.run_id}` on the same data "
        f"(content sha256 above).",
    ]
    return "\n".join(lines)


def describe_version(facts: Provenance, extra_tags: Mapping[str, str], log: Any) -> None:
    """Write the Markdown description and the provenance tags (plus ``extra_tags``) onto the version.

    Args:
        facts: the version's facts.
        extra_tags: further tags (the gate's).
        log: the run's :class:`~pipeline.registry.tracking.RunLogger` (retries while the server is away).
    """
    from pipeline.registry.tracking import metric_name

    _write(facts.model_name, facts.version, description(facts), {**tags(facts, metric_name), **extra_tags}, log)


def _write(model_name: str, version: str, text: str, version_tags: Mapping[str, str], log: Any) -> None:
    import mlflow

    client = mlflow.MlflowClient()

    def write() -> None:
        client.update_model_version(model_name, version, description=text)
        for key, value in version_tags.items():
            client.set_model_version_tag(model_name, version, key, value)

    log.call(write, "describing the model version")


@dataclass
class EnsembleProvenance:
    """The facts a fold ensemble's version carries: every fold's provenance, and the ensemble's own score.

    Args:
        model_name: the registered model's name.
        version: the ensemble's version.
        run_id: the ensemble's own MLflow run.
        dataset_name: the ``dataset.json`` name the folds trained on.
        data_hash: its content hash (one for all folds).
        num_cases: labelled cases in it.
        num_folds: the number of folds (all of them are in the ensemble).
        split_seed: the split's seed.
        cv_config_hash: hash of the configuration without the fold (the same for every fold).
        code: the code that built the ensemble (``{"package", "git_commit", "git_dirty"}``).
        plan: the preprocessing plan (one for all folds).
        folds: per fold: ``fold``, ``run_id``, ``version``, ``val_mean_dice`` (on its own validation fold).
        eval_set: the cases the ensemble was scored on, in words.
        summary: its evaluation there (Dice, HD95 and surface Dice per label).
        inference: per-fold settings (``mirror``, ``overlap`` lists) and the shared ``postprocessing``.
        gate_decision: the champion gate's decision in words.
    """

    model_name: str
    version: str
    run_id: str
    dataset_name: str
    data_hash: str
    num_cases: int
    num_folds: int
    split_seed: int
    cv_config_hash: str
    code: Mapping[str, Any]
    plan: Mapping[str, Any]
    folds: list[Mapping[str, Any]]
    eval_set: str
    summary: Mapping[str, Any]
    inference: Mapping[str, Any]
    gate_decision: str


def ensemble_tags(p: EnsembleProvenance, metric_name: Any) -> dict[str, str]:
    """Provenance tags for a fold ensemble's version: ``ensemble.fold_K.*`` per fold, plus data, code and plan.

    Args:
        p: the facts.
        metric_name: label name -> a tag-safe name.
    """
    out = {
        "model.kind": "fold_ensemble", "ensemble.num_folds": str(len(p.folds)),
        "ensemble.folds": ",".join(str(f["fold"]) for f in p.folds),
        "ensemble.fold_runs": ",".join(str(f["run_id"]) for f in p.folds),
        "data.name": p.dataset_name, "data.num_cases": str(p.num_cases), "data.content_sha256": p.data_hash,
        "data.num_folds": str(p.num_folds), "data.split_seed": str(p.split_seed),
        "config.sha256_without_fold": p.cv_config_hash,
        **_code_and_plan_tags(p.code, p.plan),
        "inference.postprocessing": str(p.inference.get("postprocessing")),
        "eval.set": p.eval_set, "eval.mean_dice": f"{p.summary['mean_dice']:.4f}", "mlflow.run_id": p.run_id,
    }
    for f in p.folds:
        out.update({f"ensemble.fold_{f['fold']}.run_id": str(f["run_id"]),
                    f"ensemble.fold_{f['fold']}.version": str(f.get("version")),
                    f"ensemble.fold_{f['fold']}.val_mean_dice": f"{f['val_mean_dice']:.4f}"})
    for name, value in p.summary["dice_per_label"].items():
        out[f"eval.dice.{metric_name(name)}"] = f"{value:.4f}"
    return out


def ensemble_description(p: EnsembleProvenance) -> str:
    """A fold ensemble version's Markdown description: what it is made of, how each fold and the whole scored.

    Args:
        p: the facts.
    """
    pp = p.inference.get("postprocessing") or {}
    removal = ", ".join([*(["all foreground"] if pp.get("foreground") else []),
                         *([f"labels {', '.join(map(str, pp['labels']))}"] if pp.get("labels") else [])]) or "off"
    lines = [
        f"## {p.model_name} version {p.version}: a {len(p.folds)}-fold ensemble",
        "",
        f"The {len(p.folds)} folds of one cross-validation, registered together by {_code_words(p.code)}: each fold "
        f"predicts with its own settings (mirroring {p.inference.get('mirror')}, overlap {p.inference.get('overlap')}) "
        "and their class probabilities are averaged.",
        f"Trained on **{p.dataset_name}**: {p.num_cases} labelled cases, content sha256 `{p.data_hash[:16]}...`, "
        f"split seed {p.split_seed}; config sha256 without the fold `{p.cv_config_hash[:16]}...`.",
        "",
        "| fold | MLflow run | version | Dice on its validation fold |",
        "| --- | --- | --- | --- |",
        *[f"| {f['fold']} | `{f['run_id']}` | {f.get('version')} | {f['val_mean_dice']:.4f} |" for f in p.folds],
        "",
        f"{_plan_words(p.plan)}",
        "",
        f"Scored on {p.eval_set}, cases none of the folds trained on:",
        "",
        *_metrics_table(p.summary),
        "",
        f"Keep-largest-component: {removal} (what most folds decided on their validation fold). The quality "
        "estimate is calibrated on the ensemble's own predictions of the cases above.",
        "",
        f"Champion gate: {p.gate_decision}.",
        "",
        *_use_it(p.model_name, p.version),
        "",
        f"Re-run: `unet-pipeline run CONFIG --fold K` for K = 0..{p.num_folds - 1} with the config of the runs above "
        "on the same data (content sha256 above), then `unet-pipeline ensemble CONFIG`.",
    ]
    return "\n".join(lines)


def describe_ensemble(facts: EnsembleProvenance, extra_tags: Mapping[str, str], log: Any) -> None:
    """Write a fold ensemble's description and tags (plus ``extra_tags``, the gate's) onto its version.

    Args:
        facts: the ensemble's facts.
        extra_tags: further tags (the gate's).
        log: the ensemble run's :class:`~pipeline.registry.tracking.RunLogger`.
    """
    from pipeline.registry.tracking import metric_name

    _write(facts.model_name, facts.version, ensemble_description(facts),
           {**ensemble_tags(facts, metric_name), **extra_tags}, log)
