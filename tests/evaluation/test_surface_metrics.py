"""Surface metrics (HD95, surface Dice) on cases small enough to work out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluation.metrics import surface_metrics

SHAPE = (16, 16, 16)


def _cubes(offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Two 6x6x6 cubes of label 1, the second shifted by ``offset`` voxels along the first axis."""
    a, b = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    a[2:8, 4:10, 4:10] = 1
    b[2 + offset:8 + offset, 4:10, 4:10] = 1
    return a, b


def test_cubes_one_voxel_apart_hd95_is_one_step_along_that_axis() -> None:
    # Every boundary voxel is within one x-step of the other boundary, and a whole face of each cube
    # (36 of 152 boundary voxels, far more than 5 %) is exactly one x-step away: HD95 = spacing[0].
    pred, truth = _cubes(1)
    assert surface_metrics(pred, truth, [1], (2.0, 1.0, 1.0))[1]["hd95"] == pytest.approx(2.0, abs=1e-6)


def test_anisotropic_spacing_changes_the_distance() -> None:
    pred, truth = _cubes(1)
    iso = surface_metrics(pred, truth, [1], (1.0, 1.0, 1.0))[1]["hd95"]
    thick = surface_metrics(pred, truth, [1], (2.0, 1.0, 1.0))[1]["hd95"]
    # Spacing along an axis the shift does not follow leaves it alone.
    other = surface_metrics(pred, truth, [1], (1.0, 3.0, 3.0))[1]["hd95"]
    assert iso == pytest.approx(1.0, abs=1e-6)
    assert thick == pytest.approx(2.0, abs=1e-6)
    assert other == pytest.approx(1.0, abs=1e-6)


def test_identical_masks_are_perfect() -> None:
    _, truth = _cubes(0)
    scores = surface_metrics(truth.copy(), truth, [1], (1.5, 0.7, 3.0))[1]
    assert scores == {"hd95": 0.0, "surface_dice": 1.0}


def _plates() -> tuple[np.ndarray, np.ndarray]:
    """Reference: one 1-voxel-thick 6x6 plate at x=2 (all 36 voxels are boundary).
    Prediction: the same plate plus a second one at x=6."""
    truth = np.zeros(SHAPE, np.uint8)
    truth[2, 2:8, 2:8] = 1
    pred = truth.copy()
    pred[6, 2:8, 2:8] = 1
    return pred, truth


def test_surface_dice_counted_by_hand() -> None:
    pred, truth = _plates()
    # Spacing 2 mm along x: the extra plate lies 4 * 2 = 8 mm from the reference.
    # Within 1 mm: 36 of the prediction's 72 boundary voxels and all 36 of the reference's,
    # so surface Dice = (36 + 36) / (72 + 36) = 2/3; half of the prediction's distances are 8 mm, so HD95 = 8.
    scores = surface_metrics(pred, truth, [1], (2.0, 1.0, 1.0), tolerance_mm=1.0)[1]
    assert scores["surface_dice"] == pytest.approx(2 / 3, abs=1e-6)
    assert scores["hd95"] == pytest.approx(8.0, abs=1e-6)
    assert surface_metrics(pred, truth, [1], (2.0, 1.0, 1.0), tolerance_mm=7.9)[1]["surface_dice"] == pytest.approx(2 / 3)
    assert surface_metrics(pred, truth, [1], (2.0, 1.0, 1.0), tolerance_mm=9.0)[1]["surface_dice"] == pytest.approx(1.0)
    # With 1-mm voxels the extra plate is 4 mm away: the same tolerance of 7.9 mm now covers it.
    assert surface_metrics(pred, truth, [1], (1.0, 1.0, 1.0), tolerance_mm=7.9)[1]["surface_dice"] == pytest.approx(1.0)


def test_missing_labels_follow_the_documented_conventions() -> None:
    _, truth = _cubes(0)
    empty = np.zeros_like(truth)
    diagonal = math.sqrt((16 * 2.0) ** 2 + 16**2 + 16**2)
    missed = surface_metrics(empty, truth, [1, 2], (2.0, 1.0, 1.0))
    assert missed[1] == {"hd95": pytest.approx(diagonal), "surface_dice": 0.0}
    assert math.isnan(missed[2]["hd95"]) and math.isnan(missed[2]["surface_dice"])  # absent from both
    spurious = surface_metrics(truth, empty, [1], (2.0, 1.0, 1.0))
    assert spurious[1] == {"hd95": pytest.approx(diagonal), "surface_dice": 0.0}


def test_labels_are_scored_independently_and_2d_works() -> None:
    pred, truth = _cubes(1)
    pred, truth = pred.copy(), truth.copy()
    pred[10:14, 10:14, 10:14] = 2
    truth[10:14, 10:14, 10:14] = 2
    scores = surface_metrics(pred, truth, [1, 2], (2.0, 1.0, 1.0))
    assert scores[1]["hd95"] == pytest.approx(2.0) and scores[2] == {"hd95": 0.0, "surface_dice": 1.0}
    p2, t2 = pred[:, :, 6], truth[:, :, 6]
    assert surface_metrics(p2, t2, [1], (2.0, 1.0))[1]["hd95"] == pytest.approx(2.0)


def test_bad_arguments() -> None:
    pred, truth = _cubes(0)
    with pytest.raises(ValueError, match="shape"):
        surface_metrics(pred[:8], truth, [1], (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        surface_metrics(pred, truth, [1], (1.0, 1.0))
