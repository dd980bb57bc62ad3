"""Quality-control pictures people look at: training curves, and a case's slices with reference and prediction outlined.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no display, no global
figure state), at a fixed size so every PNG has the same, predictable pixel size, and
each file is written under a temporary name and renamed, so a reader never sees half a PNG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from pipeline.data import atomic_file

DPI = 100
CURVES_SIZE_PX = (1200, 400)
CASE_SIZE_PX = (1200, 440)
# Pure, saturated colours that a grey-scale image can never produce, so the outlines stay visible on any anatomy.
REFERENCE_COLOUR = "#00ff00"
PREDICTION_COLOUR = "#ff00ff"
LINE_STYLES = ("solid", "dashed", "dotted", "dashdot")
REFERENCE_WIDTH, PREDICTION_WIDTH = 2.5, 1.2  # the reference is drawn wider, so it shows beside an exact prediction


def _figure(size_px: tuple[int, int]) -> Figure:
    return Figure(figsize=(size_px[0] / DPI, size_px[1] / DPI), dpi=DPI)


def _save(fig: Figure, out_png: Path) -> Path:
    """Render to a temporary PNG beside the target and rename it into place."""
    with atomic_file(out_png) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")  # no bbox_inches="tight": it would change the pixel size
    return out_png


def _plot_series(ax: Axes, points: Sequence[tuple[int, float]], **style) -> bool:
    """Plot ``(step, value)`` pairs sorted by step; non-finite values leave gaps. Whether anything was drawn."""
    if not points:
        return False
    steps, values = zip(*sorted(points))
    values = [v if math.isfinite(v) else math.nan for v in values]
    ax.plot(steps, values, marker="." if len(steps) < 30 else None, **style)
    return True


def _no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")


def _label_order(suffix: str, names: Mapping[str, str]) -> tuple[int, float, str]:
    """Label values in numeric order (10 after 2), names after them alphabetically."""
    return (0, float(suffix), "") if suffix in names and suffix.lstrip("-").isdigit() else (1, 0.0, suffix)


def curves_figure(history: Mapping[str, Sequence[tuple[int, float]]],
                  label_names: Mapping[str, str] | None = None) -> Figure:
    """The training curves' figure (see :func:`training_curves`), not yet written.

    Args:
        history: metric name -> ``(epoch, value)`` pairs (see :func:`training_curves`).
        label_names: label value -> class name (the plan's ``labels``): the training loop logs
            ``val_dice_<value>``, and a reader looks for the class, not its number.
    """
    names = {str(k): str(v) for k, v in (label_names or {}).items()}
    fig = _figure(CURVES_SIZE_PX)
    loss_ax, lr_ax, dice_ax = fig.subplots(1, 3)

    if not _plot_series(loss_ax, history.get("train_loss", []), color="tab:blue"):
        _no_data(loss_ax)
    loss_ax.set_title("training loss")

    lr = history.get("lr") or history.get("learning_rate") or []
    if _plot_series(lr_ax, lr, color="tab:orange"):
        if all(v > 0 for _, v in lr if math.isfinite(v)):
            lr_ax.set_yscale("log")  # schedules decay by orders of magnitude
    else:
        _no_data(lr_ax)
    lr_ax.set_title("learning rate")

    per_label = sorted((k[len("val_dice_"):] for k in history if k.startswith("val_dice_")),
                       key=lambda suffix: _label_order(suffix, names))
    drawn = [_plot_series(dice_ax, history[f"val_dice_{k}"], label=names.get(k, k)) for k in per_label]
    if _plot_series(dice_ax, history.get("val_dice", []), color="black", linestyle="--", label="mean"):
        drawn.append(True)
    if any(drawn):
        dice_ax.set_ylim(0, 1)
        dice_ax.legend(loc="lower right", fontsize="small")
    else:
        _no_data(dice_ax)
    dice_ax.set_title("validation Dice")

    for ax in (loss_ax, lr_ax, dice_ax):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.13, top=0.91, wspace=0.25)
    return fig


def training_curves(history: Mapping[str, Sequence[tuple[int, float]]], out_png: Path,
                    label_names: Mapping[str, str] | None = None) -> Path:
    """One PNG (1200x400 px) with three panels: training loss, learning rate, and validation Dice per label.

    Args:
        history: metric name -> ``(epoch, value)`` pairs, as logged by training: ``train_loss``,
            ``lr`` (or ``learning_rate``), ``val_dice_<label>`` per label and ``val_dice`` (their
            mean, drawn dashed). Missing metrics leave their panel saying "no data".
        out_png: the file to write (written atomically).
        label_names: label value -> class name; a ``val_dice_<value>`` line is labelled by its class.

    Returns:
        ``out_png``.
    """
    return _save(curves_figure(history, label_names), out_png)


def _centre(truth: np.ndarray, pred: np.ndarray) -> tuple[int, int, int]:
    """Voxel at the centre of mass of the reference foreground, else of the prediction's, else of the volume."""
    from scipy.ndimage import center_of_mass

    for mask in (truth != 0, pred != 0):
        if mask.any():
            com = center_of_mass(mask)
            return tuple(int(np.clip(round(c), 0, n - 1)) for c, n in zip(com, mask.shape))  # type: ignore[return-value]
    return tuple(n // 2 for n in truth.shape)  # type: ignore[return-value]


def _outline(ax: Axes, mask: np.ndarray, xs: np.ndarray, ys: np.ndarray, colour: str, width: float, style: str) -> None:
    """Contour a 2D (columns, rows) mask at 0.5, i.e. along voxel borders, in mm coordinates."""
    if mask.any() and not mask.all():  # a constant slice has no border (and matplotlib would warn)
        ax.contour(xs, ys, mask.T.astype(np.float32), levels=[0.5], colors=[colour], linewidths=width,
                   linestyles=style)


def case_qc_image(
    image: np.ndarray,
    truth: np.ndarray,
    pred: np.ndarray,
    label_names: Mapping[int, str],
    out_png: Path,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> Path:
    """One PNG (1200x440 px): axial, coronal and sagittal slices with the reference and prediction outlined.

    The slices cross at the centre of mass of the reference foreground (of the prediction
    when the reference is empty, of the volume when both are). Arrays are shown as stored:
    the first axis runs left to right in the axial and coronal panels, the third axis up;
    the panel names assume the usual (left-right, posterior-anterior, inferior-superior)
    axis order of RAS or LPS volumes. Pixels are drawn in millimetres, so anisotropic
    voxels keep their true proportions. The image is windowed to its 1st-99th percentile.
    Each label is outlined along its voxel borders, the reference in green and wide, the
    prediction in magenta and narrow on top; labels differ by line style, named in the legend.

    Args:
        image: the 3D image (one channel).
        truth: the 3D reference label map, same shape.
        pred: the 3D predicted label map, same shape.
        label_names: label value -> name; background (0) is not outlined.
        out_png: the file to write (written atomically).
        spacing: voxel size in mm along each axis.

    Returns:
        ``out_png``.
    """
    if image.ndim != 3 or truth.shape != image.shape or pred.shape != image.shape:
        raise ValueError(f"expected three 3D arrays of one shape, got {image.shape}, {truth.shape}, {pred.shape}")
    if len(spacing) != 3:
        raise ValueError(f"spacing needs 3 values, got {tuple(spacing)}")
    sx, sy, sz = (float(s) for s in spacing)
    cx, cy, cz = _centre(truth, pred)
    lo, hi = (float(v) for v in np.percentile(image, [1, 99]))
    if hi <= lo:
        hi = lo + 1.0  # a constant image: any window shows it

    def axis(n: int, s: float) -> np.ndarray:
        return np.arange(n) * s

    nx, ny, nz = image.shape
    # (panel title, slice of image/truth/pred as (columns, rows), column and row coordinates in mm)
    panels = [
        (f"axial (z={cz})", np.s_[:, :, cz], axis(nx, sx), axis(ny, sy)),
        (f"coronal (y={cy})", np.s_[:, cy, :], axis(nx, sx), axis(nz, sz)),
        (f"sagittal (x={cx})", np.s_[cx, :, :], axis(ny, sy), axis(nz, sz)),
    ]
    labels = sorted(v for v in label_names if v != 0)
    styles = {v: LINE_STYLES[i % len(LINE_STYLES)] for i, v in enumerate(labels)}

    fig = _figure(CASE_SIZE_PX)
    axes = fig.subplots(1, 3)
    for ax, (title, where, xs, ys) in zip(axes, panels):
        cols, rows = xs[1] - xs[0] if len(xs) > 1 else 1.0, ys[1] - ys[0] if len(ys) > 1 else 1.0
        extent = (xs[0] - cols / 2, xs[-1] + cols / 2, ys[0] - rows / 2, ys[-1] + rows / 2)
        ax.imshow(image[where].T.astype(np.float32), cmap="gray", vmin=lo, vmax=hi, origin="lower", extent=extent,
                  interpolation="nearest", aspect="equal")
        for v in labels:
            _outline(ax, truth[where] == v, xs, ys, REFERENCE_COLOUR, REFERENCE_WIDTH, styles[v])
        for v in labels:
            _outline(ax, pred[where] == v, xs, ys, PREDICTION_COLOUR, PREDICTION_WIDTH, styles[v])
        ax.set_title(title, fontsize="medium")
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Line2D([], [], color=REFERENCE_COLOUR, linewidth=REFERENCE_WIDTH, label="reference"),
               Line2D([], [], color=PREDICTION_COLOUR, linewidth=PREDICTION_WIDTH, label="prediction")]
    handles += [Line2D([], [], color="0.3", linestyle=styles[v], label=str(label_names[v])) for v in labels]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize="medium")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.12, top=0.93, wspace=0.04)
    return _save(fig, out_png)
