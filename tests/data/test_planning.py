"""The spacing plan: a lower-resolution stage where the full-resolution patch covers too little of the case."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.data.planning import (
    LOWRES_MIN_COVERAGE,
    MIN_STRUCTURE_VOXELS,
    plan_network,
    plan_spacing,
    thinnest_sides_mm,
)
from tests.conftest import SHARED_DATA


def _coverage(fp: dict, spacing: list[float]) -> float:
    plan = plan_network(fp, spacing, 3, "cpu")
    return math.prod(plan["patch_size"]) / math.prod(plan["median_shape"])


def test_a_small_case_trains_at_its_own_spacing() -> None:
    fp = {"shapes": [[36, 50, 35]] * 3, "spacings": [[1.0, 1.0, 1.0]] * 3, "structure_thinnest_mm": [14.5, 19.0]}
    spacing, stage = plan_spacing(fp, [1.0, 1.0, 1.0], 3, "cpu")
    assert spacing == [1.0, 1.0, 1.0] and stage["name"] == "fullres" and stage["coverage"] >= LOWRES_MIN_COVERAGE


def test_a_large_case_gets_a_coarser_stage_until_the_patch_covers_a_quarter() -> None:
    fp = {"shapes": [[190, 142, 88]] * 3, "spacings": [[0.625] * 3] * 3, "structure_thinnest_mm": [35.0]}
    assert _coverage(fp, [0.625] * 3) < LOWRES_MIN_COVERAGE
    spacing, stage = plan_spacing(fp, [0.625] * 3, 3, "cpu")
    assert stage["name"] == "lowres" and stage["fullres_spacing"] == [0.625] * 3
    assert _coverage(fp, spacing) >= LOWRES_MIN_COVERAGE
    # The smallest step that gets there: one 3 % step less still covers too little.
    assert _coverage(fp, [s / 1.03 for s in spacing]) < LOWRES_MIN_COVERAGE
    assert spacing[0] == spacing[1] == spacing[2]
    # On a GPU the patch holds the case: no lower-resolution stage.
    assert plan_spacing(fp, [0.625] * 3, 3, "cuda", 80.0)[1]["name"] == "fullres"


def test_the_finest_axes_coarsen_first_on_an_anisotropic_grid() -> None:
    fp = {"shapes": [[400, 400, 40]] * 3, "spacings": [[0.5, 0.5, 3.0]] * 3, "structure_thinnest_mm": [40.0]}
    spacing, stage = plan_spacing(fp, [0.5, 0.5, 3.0], 3, "cpu")
    assert stage["name"] == "lowres" and spacing[2] == 3.0 and spacing[0] == spacing[1] > 0.5


def test_a_thin_structure_keeps_the_full_resolution_and_says_why() -> None:
    fp = {"shapes": [[128, 128, 128]] * 3, "spacings": [[3.9, 3.9, 2.5]] * 3,
          "structure_thinnest_mm": [31.0, 3.9 * (MIN_STRUCTURE_VOXELS - 1)]}
    spacing, stage = plan_spacing(fp, [3.9, 3.9, 2.5], 3, "cpu")
    assert spacing == [3.9, 3.9, 2.5] and stage["name"] == "fullres" and "thinnest structure" in stage["why"]
    # The same data with only thick structures does get the coarser stage.
    fp["structure_thinnest_mm"] = [60.0, 50.0]
    assert plan_spacing(fp, [3.9, 3.9, 2.5], 3, "cpu")[1]["name"] == "lowres"


def test_thinnest_sides_are_the_bounding_boxes_thinnest_side() -> None:
    label = np.zeros((20, 30, 40), np.uint8)
    label[2:12, 5:8, 10:30] = 1  # 10 x 3 x 20 voxels
    label[0, 0, 0] = 2
    sides = thinnest_sides_mm(label, [1, 2, 3], [1.0, 2.0, 0.5])
    assert sides[0] == pytest.approx(6.0) and sides[1] == pytest.approx(0.5) and math.isnan(sides[2])


def _real_fingerprint(folder: Path, cases: int) -> dict:
    shapes, spacings, thinnest = [], [], []
    for image in sorted((folder / "imagesTr").glob("*.nii.gz")):
        header = nib.load(image).header
        shapes.append([int(s) for s in header.get_data_shape()[:3]])
        spacings.append([float(z) for z in header.get_zooms()[:3]])
    for path in sorted((folder / "labelsTr").glob("*.nii.gz"))[:cases]:
        img = nib.load(path)
        label = np.asarray(img.dataobj).astype(np.uint8)
        values = list(range(1, int(label.max()) + 1))
        thinnest.append(thinnest_sides_mm(label, values, [float(z) for z in img.header.get_zooms()[:3]]))
    width = max(len(t) for t in thinnest)
    rows = np.array([t + [math.nan] * (width - len(t)) for t in thinnest])
    return {"shapes": shapes, "spacings": spacings,
            "structure_thinnest_mm": [float(v) for v in np.nanmedian(rows, axis=0)]}


@pytest.mark.parametrize("task, stage", [("left_atrium", "lowres"), ("hn_ct", "fullres")])
def test_the_real_tasks_plans(task: str, stage: str) -> None:
    folder = SHARED_DATA / task
    if not folder.is_dir():
        pytest.skip(f"real {task} data not found at {folder} (see ../shared/data/README.md)")
    fp = _real_fingerprint(folder, cases=8)
    median = [float(v) for v in np.median(fp["spacings"], axis=0)]
    spacing, planned = plan_spacing(fp, median, 3, "cpu")
    assert planned["name"] == stage, planned
    if stage == "lowres":  # the left atrium: 0.625 mm, ~190x142x88 voxels, one large structure
        assert planned["fullres_coverage"] < LOWRES_MIN_COVERAGE <= planned["coverage"] and min(spacing) > 0.625
    else:  # head-and-neck CT: the spinal cord is ~5 voxels across at 3.9 mm already
        assert min(fp["structure_thinnest_mm"]) / max(median) < MIN_STRUCTURE_VOXELS and spacing == median


def _make_plan(fp: dict, patch_size: list[int] | None) -> dict:
    """The plan ``preprocess`` makes for this fingerprint, on a CPU, with ``train.patch_size`` fixed or planned."""
    import torch

    from pipeline.config import load_config
    from pipeline.data.dataset import Dataset
    from pipeline.data.preprocess import make_plan

    overrides = [f"train.patch_size={patch_size}" if patch_size else "train.patch_size=null",
                 "model.features=null", "preprocess.target_spacing=null"]
    cfg = load_config(None, overrides)
    fp = {**fp, "median_spacing": [float(v) for v in np.median(fp["spacings"], axis=0)],
          "foreground_intensity": [{"percentile_00_5": 0.0, "percentile_99_5": 1.0, "mean": 0.5, "std": 0.1}]}
    dataset = Dataset(Path("unused"), "constructed", {0: "MRI"}, {0: "background", 1: "organ"})
    return make_plan(cfg, dataset, fp, torch.device("cpu"))


def test_a_fixed_patch_that_covers_the_case_keeps_the_full_resolution() -> None:
    # 160 mm cubes at 1 mm: the planned CPU patch (at most 64^3) covers 6 % of the median case.
    fp = {"shapes": [[160, 160, 160]] * 3, "spacings": [[1.0] * 3] * 3, "structure_thinnest_mm": [60.0]}
    assert plan_spacing(fp, [1.0] * 3, 3, "cpu")[1]["name"] == "lowres"
    spacing, stage = plan_spacing(fp, [1.0] * 3, 3, "cpu", patch_size=[128, 128, 128])
    assert spacing == [1.0] * 3 and stage == {"name": "fullres", "coverage": 0.512, "patch_size": [128, 128, 128]}
    # Through the plan preprocess makes: the config's patch trains, at the full resolution.
    fixed = _make_plan(fp, [128, 128, 128])
    assert fixed["target_spacing"] == [1.0] * 3 and fixed["network"]["patch_size"] == [128, 128, 128]
    assert _make_plan(fp, None)["stage"]["name"] == "lowres"


def test_a_small_fixed_patch_gets_the_coarser_stage_the_planned_one_would_not() -> None:
    fp = {"shapes": [[40, 40, 40]] * 3, "spacings": [[1.0] * 3] * 3, "structure_thinnest_mm": [30.0]}
    assert plan_spacing(fp, [1.0] * 3, 3, "cpu")[1]["name"] == "fullres"  # the planned 40^3 patch holds the case
    spacing, stage = plan_spacing(fp, [1.0] * 3, 3, "cpu", patch_size=[16, 16, 16])
    assert stage["name"] == "lowres" and stage["fullres_coverage"] == pytest.approx(16**3 / 40**3, abs=1e-3)
    # Coarsened until that 16^3 patch covers a quarter of the case, no further.
    assert math.prod([16] * 3) / math.prod([40 / s for s in spacing]) >= LOWRES_MIN_COVERAGE
    assert math.prod([16] * 3) / math.prod([40 * 1.03 / s for s in spacing]) < LOWRES_MIN_COVERAGE
    assert _make_plan(fp, [16, 16, 16])["target_spacing"] == spacing
