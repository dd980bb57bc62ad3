"""Keep-the-largest-component: the removal, nnU-Net's decision rule on real hippocampus labels and predictions,
and the decision travelling with the registered model."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from scipy import ndimage

from pipeline.cli import main
from pipeline.evaluation.postprocessing_choice import decide, variant_scores
from pipeline.inference.postprocessing import Postprocessing, largest_component
from tests.conftest import HIPPOCAMPUS, TINY, copy_hippocampus_subset


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return float("nan") if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def _keep_largest(mask: np.ndarray) -> np.ndarray:
    """Independent of the package: label with 26-connectivity, keep the most frequent non-zero label."""
    labelled, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(3, 3))
    if n <= 1:
        return mask
    counts = np.bincount(labelled.ravel())[1:]
    return labelled == 1 + int(np.argmax(counts))


def test_largest_component_uses_full_connectivity() -> None:
    mask = np.zeros((6, 6, 6), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True  # corner neighbours: one component
    mask[5, 5, 5] = True
    kept = largest_component(mask)
    assert kept[1, 1, 1] and kept[2, 2, 2] and not kept[5, 5, 5]
    assert not largest_component(np.zeros((3, 3, 3), bool)).any()


def test_apply_removes_only_what_was_decided() -> None:
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[1:4, 1:4, 1:4] = 1
    labels[8:10, 8:10, 8:10] = 1   # a second, smaller label-1 island
    labels[1:4, 6:9, 1:4] = 2
    labels[10, 1, 10] = 2          # a stray label-2 voxel
    only_1 = Postprocessing(labels=(1,)).apply(labels)
    assert (only_1[8:10, 8:10, 8:10] == 0).all() and only_1[10, 1, 10] == 2
    fg = Postprocessing(foreground=True).apply(labels)
    # All foreground together: the biggest blob is label 1's (27) or label 2's (27) cube -- each is its own component.
    assert fg.sum() < labels.sum()
    assert labels.sum() == Postprocessing().apply(labels).sum()


def _real_labels(n: int) -> list[np.ndarray]:
    files = sorted((HIPPOCAMPUS / "labelsTr").glob("*.nii.gz"))[:n]
    if len(files) < n:
        pytest.skip(f"real hippocampus data not found at {HIPPOCAMPUS} (see ../shared/data/README.md)")
    return [np.asarray(nib.load(f).dataobj).astype(np.uint8) for f in files]


def test_decision_on_real_hippocampus_labels_follows_the_dice() -> None:
    """Real label maps made into predictions: a false island of label 1 (removing it helps), a true island of
    label 2 present in both maps (removing it hurts). Each removal is chosen exactly when the Dice computed
    here, independently, improves."""
    rng = np.random.RandomState(0)
    cases = []
    for truth in _real_labels(6):
        truth = truth.copy()
        pred = truth.copy()
        free = np.argwhere(ndimage.distance_transform_edt(truth == 0) > 4)
        a, b = free[rng.choice(len(free), 2, replace=False)]
        pred[tuple(slice(c - 1, c + 2) for c in a)] = 1                 # false positive island, label 1
        truth[tuple(slice(c - 1, c + 1) for c in b)] = 2                # a true second component of label 2 ...
        pred[tuple(slice(c - 1, c + 1) for c in b)] = 2                 # ... that the prediction found
        pred[(pred == 2) & (rng.rand(*pred.shape) < 0.1)] = 0           # and some misses, so Dice < 1
        cases.append((pred, truth))

    decision = decide([variant_scores(p, t, [1, 2]) for p, t in cases], [1, 2])

    def mean(fn, label):
        return float(np.nanmean([_dice(fn(p, label), t == label) for p, t in cases]))

    def fg_removed(p: np.ndarray) -> np.ndarray:
        out = p.copy()
        out[(p > 0) & ~_keep_largest(p > 0)] = 0
        return out

    raw = {v: mean(lambda p, v: p == v, v) for v in (1, 2)}
    fg = {v: mean(lambda p, v: fg_removed(p) == v, v) for v in (1, 2)}
    assert decision.postprocessing.foreground == (np.mean(list(fg.values())) > np.mean(list(raw.values())))
    base = fg if decision.postprocessing.foreground else raw
    prep = fg_removed if decision.postprocessing.foreground else (lambda p: p)
    for v in (1, 2):
        with_lcc = mean(lambda p, v: _keep_largest(prep(p) == v), v)
        assert (v in decision.postprocessing.labels) == (with_lcc > base[v]), (v, with_lcc, base[v])
    # Both branches of the rule were exercised: label 1 gained, label 2 would have lost.
    assert 1 in decision.postprocessing.labels or decision.postprocessing.foreground
    assert 2 not in decision.postprocessing.labels


@pytest.mark.slow
def test_decision_on_real_predictions_travels_with_the_registered_model(tmp_path: Path) -> None:
    """A run on real hippocampus cases decides on its own validation predictions; the registered model
    carries the decision, and ``predict`` applies it (``--no-postprocess`` gives the raw argmax)."""
    if not (HIPPOCAMPUS / "dataset.json").is_file():
        pytest.skip(f"real hippocampus data not found at {HIPPOCAMPUS}")
    dataset = copy_hippocampus_subset(tmp_path / "ds", 12)
    cfg = json.loads(json.dumps(TINY))
    cfg["data"] = {"dataset": str(dataset), "num_folds": 3}
    cfg["train"].update({"epochs": 4, "patch_size": [32, 32, 32], "val_every": 4})
    cfg["mlflow"]["model_name"] = "hippo-pp"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    work = tmp_path / "w"
    assert main(["run", str(config), "--work-dir", str(work)]) == 0
    summary = json.loads((work / "evaluation" / "fold_0" / "summary.json").read_text())
    split = json.loads((work / "splits.json").read_text())["folds"][0]["val"]
    images = [dataset.parent / "imagesTr" / f"{case}.nii.gz" for case in split]
    raw_dir, final_dir = tmp_path / "raw", tmp_path / "final"
    common = ["--model", "models:/hippo-pp@champion", *map(str, images), "--work-dir", str(work)]
    assert main(["predict", *common, "--out", str(raw_dir), "--no-postprocess"]) == 0
    assert main(["predict", *common, "--out", str(final_dir)]) == 0

    raws = {c: np.asarray(nib.load(raw_dir / f"{c}.nii.gz").dataobj) for c in split}
    truths = {c: np.asarray(nib.load(dataset.parent / "labelsTr" / f"{c}.nii.gz").dataobj) for c in split}
    decided = Postprocessing.from_dict(summary["postprocessing"])
    # The decision is the rule applied to these real predictions (recomputed here).
    expected = decide([variant_scores(raws[c], truths[c], [1, 2]) for c in split], [1, 2]).postprocessing
    assert decided == expected
    per_label_raw = {v: np.nanmean([_dice(raws[c] == v, truths[c] == v) for c in split]) for v in (1, 2)}
    for v in decided.labels:
        gained = np.nanmean([_dice(_keep_largest(Postprocessing(decided.foreground).apply(raws[c]) == v),
                                   truths[c] == v) for c in split])
        assert gained > per_label_raw[v] or decided.foreground
    # It travels with the registered model and predict applies it by default.
    import torch

    from pipeline.inference.model import load_model
    from pipeline.registry.registration import resolve_model

    model = load_model(resolve_model("models:/hippo-pp@champion", work, tmp_path / "dl").path, torch.device("cpu"))
    assert model.settings.postprocessing == decided
    for c in split:
        np.testing.assert_array_equal(np.asarray(nib.load(final_dir / f"{c}.nii.gz").dataobj), decided.apply(raws[c]))
    assert summary["mean_dice"] >= summary["mean_dice_without_postprocessing"]
