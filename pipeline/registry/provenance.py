"""What a registered version carries about itself: a Markdown description and provenance tags.

A colleague looking at a version sees what it was trained on (dataset name, number
of cases, content hash, fold), with what (config hash, package version and git
commit, the plan), how well it did (Dice, HD95 and surface Dice per label), what the
champion gate decided, and how to use it with or without this project installed.
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


def _x(values: Any) -> str:
    return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def tags(p: Provenance, metric_name: Any) -> dict[str, str]:
    """Provenance tags for the model version.

    Args:
        p: the facts.
        metric_name: label name -> a tag-safe name.
    """
    net = p.plan.get("network", {})
    out = {
        "data.name": p.dataset_name, "data.num_cases": str(p.num_cases), "data.content_sha256": p.data_hash,
        "data.fold": str(p.fold), "data.num_folds": str(p.num_folds), "data.split_seed": str(p.split_seed),
        "data.num_train": str(p.num_train), "data.num_val": str(p.num_val),
        "config.sha256": p.config_hash,
        "code.package_version": str(p.code.get("package")), "code.git_commit": str(p.code.get("git_commit")),
        "code.git_dirty": str(p.code.get("git_dirty")),
        "plan.spacing_mm": _x(p.plan.get("target_spacing", [])), "plan.orientation": str(p.plan.get("orientation")),
        "plan.normalization": ",".join(p.plan.get("normalization", [])),
        "plan.patch_size": _x(net.get("patch_size", [])), "plan.features": "-".join(map(str, net.get("features", []))),
        "plan.spatial_dims": str(net.get("spatial_dims")),
        "inference.mirror": str(p.inference.get("mirror")), "inference.overlap": str(p.inference.get("overlap")),
        "inference.postprocessing": str(p.inference.get("postprocessing")),
        "val.mean_dice": f"{p.summary['mean_dice']:.4f}", "mlflow.run_id": p.run_id,
    }
    for name, value in p.summary["dice_per_label"].items():
        out[f"val.dice.{metric_name(name)}"] = f"{value:.4f}"
    return out


def description(p: Provenance) -> str:
    """The version's Markdown description.

    Args:
        p: the facts.
    """
    net = p.plan.get("network", {})
    s = p.summary
    commit = p.code.get("git_commit")
    dirty = " + local changes" if p.code.get("git_dirty") else ""
    code = f"unet-pipeline {p.code.get('package')}" + (f" (git {str(commit)[:12]}{dirty})" if commit else "")
    lines = [
        f"## {p.model_name} version {p.version}",
        "",
        f"Trained by {code} on **{p.dataset_name}**: {p.num_cases} labelled cases, content sha256 `{p.data_hash[:16]}...`, "
        f"fold {p.fold} of {p.num_folds} (split seed {p.split_seed}: {p.num_train} training / {p.num_val} validation cases).",
        "",
        f"Plan: {p.plan.get('orientation')} at {_x(p.plan.get('target_spacing', []))} mm, "
        f"{', '.join(p.plan.get('normalization', []))} normalisation, {net.get('spatial_dims')}D U-Net "
        f"{'-'.join(map(str, net.get('features', [])))}, patch {_x(net.get('patch_size', []))}. "
        f"Config sha256 `{p.config_hash[:16]}...` (the resolved config is the run's `config/resolved.yaml`).",
        "",
        "| label | Dice | HD95 (mm) | surface Dice |",
        "| --- | --- | --- | --- |",
    ]
    for name, dice in s["dice_per_label"].items():
        hd = s.get("hd95_per_label", {}).get(name, float("nan"))
        sd = s.get("surface_dice_per_label", {}).get(name, float("nan"))
        lines.append(f"| {name} | {dice:.4f} | {hd:.2f} | {sd:.4f} |")
    lines.append(f"| **mean** | **{s['mean_dice']:.4f}** | | |")
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
        "### Use it",
        "",
        "```bash",
        f"unet-pipeline predict --model models:/{p.model_name}/{p.version} SCAN_OR_DICOM_FOLDER... --out DIR",
        "```",
        "",
        "Without this project installed (the model ships its code and requirements):",
        "",
        "```python",
        "import mlflow, nibabel as nib",
        f"model = mlflow.pyfunc.load_model('models:/{p.model_name}/{p.version}')",
        "scan = nib.load('scan.nii.gz')",
        "labels = model.predict({'image': scan.get_fdata(), 'affine': scan.affine})  # on the scan's grid",
        "```",
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
    import mlflow

    from pipeline.registry.tracking import metric_name

    client = mlflow.MlflowClient()
    version_tags = {**tags(facts, metric_name), **extra_tags}

    def write() -> None:
        client.update_model_version(facts.model_name, facts.version, description=description(facts))
        for key, value in version_tags.items():
            client.set_model_version_tag(facts.model_name, facts.version, key, value)

    log.call(write, "describing the model version")
