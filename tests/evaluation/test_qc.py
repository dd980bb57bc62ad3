"""QC pictures: decoded back from PNG and checked for size, content and where the outlines are."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from pipeline.evaluation.qc_pictures import (
    CASE_SIZE_PX,
    CURVES_SIZE_PX,
    case_qc_image,
    curves_figure,
    training_curves,
)

LABELS = {0: "background", 1: "anterior", 2: "posterior"}


def _rgb(path: Path) -> np.ndarray:
    pixels = mpimg.imread(path)  # float RGBA in 0..1
    return pixels[..., :3]


def _green(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 1] > 0.8) & (rgb[..., 0] < 0.25) & (rgb[..., 2] < 0.25)


def _magenta(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 0] > 0.8) & (rgb[..., 2] > 0.8) & (rgb[..., 1] < 0.25)


def _volume(shape=(40, 40, 40), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, shape[0])[:, None, None]
    return (200 * x + rng.normal(0, 10, shape)).astype(np.float32)


def _left_right_masks(shape=(40, 40, 40)) -> tuple[np.ndarray, np.ndarray]:
    """Reference cube at low x, predicted cube at high x, both over the same y and z ranges."""
    truth, pred = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    truth[5:15, 12:28, 12:28] = 1
    pred[25:35, 12:28, 12:28] = 2
    return truth, pred


def test_case_image_size_content_and_outline_positions(tmp_path: Path) -> None:
    image = _volume()
    truth, pred = _left_right_masks()
    out = case_qc_image(image, truth, pred, LABELS, tmp_path / "qc" / "case.png", spacing=(1, 1, 1))
    rgb = _rgb(out)
    assert rgb.shape[:2] == (CASE_SIZE_PX[1], CASE_SIZE_PX[0]) == (440, 1200)
    assert rgb.var() > 0.005  # not blank

    # The legend alone: the same call with nothing to outline. What is left are the contours.
    empty = np.zeros_like(truth)
    legend = _rgb(case_qc_image(image, empty, empty, LABELS, tmp_path / "legend.png"))
    green = _green(rgb) & ~_green(legend)
    magenta = _magenta(rgb) & ~_magenta(legend)
    assert _green(legend).any() and _magenta(legend).any()  # the legend shows both colours...
    assert green.sum() > 100 and magenta.sum() > 100  # ...and the panels add outlines of both

    third = rgb.shape[1] // 3
    axial_g, axial_m = np.nonzero(green[:, :third])[1], np.nonzero(magenta[:, :third])[1]
    # Slices cross at the reference's centre (x=9.5): in the axial panel the reference is left of the prediction.
    assert axial_g.size and axial_m.size and axial_g.max() < axial_m.min()
    # The sagittal slice (x = reference centre) crosses the reference only.
    assert green[:, 2 * third:].sum() > 50
    assert magenta[:, 2 * third:].sum() == 0


def test_case_image_no_prediction_colour_without_prediction(tmp_path: Path) -> None:
    image = _volume()
    truth, _ = _left_right_masks()
    empty = np.zeros_like(truth)
    rgb = _rgb(case_qc_image(image, truth, empty, LABELS, tmp_path / "a.png"))
    legend = _rgb(case_qc_image(image, empty, empty, LABELS, tmp_path / "legend.png"))
    assert (_green(rgb) & ~_green(legend)).sum() > 100
    assert (_magenta(rgb) & ~_magenta(legend)).sum() == 0


def test_case_image_follows_the_prediction_when_the_reference_is_empty(tmp_path: Path) -> None:
    image = _volume()
    _, pred = _left_right_masks()
    empty = np.zeros_like(pred)
    rgb = _rgb(case_qc_image(image, empty, pred, LABELS, tmp_path / "p.png"))
    legend = _rgb(case_qc_image(image, empty, empty, LABELS, tmp_path / "legend.png"))
    magenta = _magenta(rgb) & ~_magenta(legend)
    # Centred on the prediction, all three panels cut through it.
    third = rgb.shape[1] // 3
    assert all(magenta[:, i * third:(i + 1) * third].sum() > 50 for i in range(3))


def _grey_box(rgb: np.ndarray) -> tuple[int, int]:
    """Height and width in pixels of the mid-grey image area: the largest connected grey region (not text, not lines)."""
    from scipy.ndimage import find_objects, label

    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    regions, _ = label((np.abs(r - g) < 0.02) & (np.abs(g - b) < 0.02) & (r > 0.3) & (r < 0.7))
    largest = np.argmax(np.bincount(regions.ravel())[1:]) + 1
    rows, cols = find_objects(regions)[largest - 1]
    return rows.stop - rows.start, cols.stop - cols.start


def test_case_image_keeps_the_proportions_of_anisotropic_voxels(tmp_path: Path) -> None:
    image = np.full((40, 40, 20), 100.0, np.float32)
    speckle = np.random.default_rng(0).random(image.shape)
    image[speckle < 0.03], image[speckle > 0.97] = 0.0, 200.0  # the 1-99 % window puts the bulk at mid-grey
    labels = np.zeros(image.shape, np.uint8)
    rgb = _rgb(case_qc_image(image, labels, labels, LABELS, tmp_path / "aniso.png", spacing=(0.5, 0.5, 3.0)))
    third = rgb.shape[1] // 3
    ah, aw = _grey_box(rgb[:, :third])  # axial: 20 mm x 20 mm
    ch, cw = _grey_box(rgb[:, third:2 * third])  # coronal: 20 mm wide, 60 mm high
    assert ah / aw == pytest.approx(1.0, abs=0.05)
    assert ch / cw == pytest.approx(3.0, abs=0.15)


def test_case_image_is_written_atomically_and_checks_shapes(tmp_path: Path) -> None:
    image = _volume((16, 16, 16))
    labels = np.zeros(image.shape, np.uint8)
    out = case_qc_image(image, labels, labels, LABELS, tmp_path / "c.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="shape"):
        case_qc_image(image, labels[:8], labels, LABELS, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_training_curves_with_several_labels(tmp_path: Path) -> None:
    epochs = range(1, 41)
    history = {
        "train_loss": [(e, 1.5 * np.exp(-e / 10)) for e in epochs],
        "lr": [(e, 0.01 * (1 - e / 41) ** 0.9) for e in epochs],
        "val_dice_anterior": [(e, 0.8 * (1 - np.exp(-e / 8))) for e in epochs[::4]],
        "val_dice_posterior": [(e, 0.7 * (1 - np.exp(-e / 8))) for e in epochs[::4]],
        "val_dice_third": [(e, 0.5) for e in epochs[::4]],
        "val_dice": [(e, 0.6) for e in epochs[::4]],
    }
    out = training_curves(history, tmp_path / "curves.png")
    rgb = _rgb(out)
    assert rgb.shape[:2] == (CURVES_SIZE_PX[1], CURVES_SIZE_PX[0]) == (400, 1200)
    assert rgb.var() > 0.001
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]

    # The Dice panel draws one colour per label: with three labels it holds more coloured pixels than with one.
    def coloured(path: Path) -> int:
        part = _rgb(path)[:, 2 * 400:]
        return int((part.max(axis=-1) - part.min(axis=-1) > 0.3).sum())

    one = training_curves({"val_dice_anterior": history["val_dice_anterior"]}, tmp_path / "one.png")
    assert coloured(out) > 1.8 * coloured(one)


def test_validation_lines_are_labelled_by_class_name(tmp_path: Path) -> None:
    # What the training loop writes to history.jsonl: val_dice_<label value>; the plan names the values.
    history = {f"val_dice_{v}": [(e, 0.1 * v / 10 + e / 100) for e in (5, 10)] for v in (1, 2, 10)}
    history["val_dice"] = [(5, 0.3), (10, 0.4)]
    plan_labels = {"0": "background", "1": "Anterior", "2": "Posterior", "10": "Tail"}
    dice_ax = curves_figure(history, plan_labels).axes[2]
    assert [t.get_text() for t in dice_ax.get_legend().get_texts()] == ["Anterior", "Posterior", "Tail", "mean"]
    # A value the plan does not name keeps its number rather than vanishing.
    unnamed = curves_figure({"val_dice_3": [(1, 0.5)]}, plan_labels).axes[2]
    assert [t.get_text() for t in unnamed.get_legend().get_texts()] == ["3"]
    assert training_curves(history, tmp_path / "named.png", plan_labels).is_file()


def test_training_curves_without_data_still_draws(tmp_path: Path) -> None:
    rgb = _rgb(training_curves({}, tmp_path / "empty.png"))
    assert rgb.shape[:2] == (400, 1200)
    assert rgb.var() > 0  # axes, titles and "no data"
    nan_history = {"train_loss": [(1, float("nan")), (2, 0.5), (3, 0.4)], "lr": [(1, 0.0), (2, 0.01)]}
    assert training_curves(nan_history, tmp_path / "nan.png").is_file()
