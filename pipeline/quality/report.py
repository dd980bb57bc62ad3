"""The batch report: one self-contained ``report.html`` that a reviewer opens in a browser, offline.

Everything travels inside the file: thumbnails and plots as base64 PNG data URIs, CSS and
the small sorting script inline, so it can be mailed, archived or opened from a share with
no server and no internet. Every text taken from a record (case names, reasons, model
names) is HTML-escaped: case names come from file and folder names nobody vetted.
The document is written pure ASCII (non-ASCII as character references), so it reads the
same whatever the locale encoding of the process that wrote it.

Under the summary, each model's estimate says how well it ranked validation cases it had not
seen; where that fell short of the bar the report says the estimate is not reliable, and
every estimated Dice of that model reads as indicative ("~0.61", greyed) instead of as a
three-decimal measurement.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.data import write_text_atomic
from pipeline.quality.calibration import RELIABLE_MIN_RHO
from pipeline.quality.records import review_order

DPI = 100
THUMB_SIZE_PX = (360, 130)
VOLUME_PLOT_SIZE_PX = (420, 200)
TABLE_ID = "cases"
# Pure, saturated colours a grey-scale image can never produce, one per label in label order.
LABEL_COLOURS = ("#ff0000", "#00ff00", "#0080ff", "#ffff00", "#ff00ff", "#00ffff")
FILL_ALPHA = 0.35
FLAG_COLOUR = "#d62728"
MISSING = "&ndash;"
#: the hover text of an estimated Dice from a model whose estimate is not reliable.
INDICATIVE = "indicative only: the estimated Dice is not reliable for this model"


def _figure(size_px: tuple[int, int], **kwargs: Any) -> Figure:
    return Figure(figsize=(size_px[0] / DPI, size_px[1] / DPI), dpi=DPI, **kwargs)


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, format="png", facecolor=fig.get_facecolor())  # no bbox_inches: fixed pixel size
    return buffer.getvalue()


def _centre(mask: np.ndarray) -> tuple[int, int, int]:
    """Voxel at the centre of mass of the mask, or of the volume when the mask is empty."""
    from scipy.ndimage import center_of_mass

    if mask.any():
        com = center_of_mass(mask)
        return tuple(int(np.clip(round(c), 0, n - 1)) for c, n in zip(com, mask.shape))  # type: ignore[return-value]
    return tuple(n // 2 for n in mask.shape)  # type: ignore[return-value]


def label_colour(index: int) -> str:
    """The overlay colour of the ``index``-th label (0-based, in label order); colours repeat after six.

    Args:
        index: the label's position in ``label_values``.
    """
    return LABEL_COLOURS[index % len(LABEL_COLOURS)]


def _panel(plane: np.ndarray, col_mm: float, row_mm: float, box: tuple[int, int]) -> tuple[int, int]:
    """The pixel size of one panel: the plane in millimetres, scaled to fit ``box`` (width, height)."""
    width_mm, height_mm = plane.shape[0] * col_mm, plane.shape[1] * row_mm
    scale = min(box[0] / width_mm, box[1] / height_mm)
    return max(1, round(width_mm * scale)), max(1, round(height_mm * scale))


def _edge(mask: np.ndarray) -> np.ndarray:
    """The mask's pixels with a 4-neighbour outside it: its outline."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def overlay_thumbnail(image: np.ndarray, labels: np.ndarray, spacing: Sequence[float], label_values: Sequence[int]) -> bytes:
    """A small PNG (360x130 px): axial, coronal and sagittal slices with each label filled and outlined in its colour.

    The slices cross at the centre of mass of the predicted structure (all of ``label_values``
    together), at the volume centre when it is empty. Arrays are shown as stored, as in the
    QC pictures: the first axis left to right in the axial and coronal panels, the third
    axis up; pixels are drawn in millimetres so anisotropic voxels keep their proportions.
    The image is windowed to its 1st-99th percentile; the i-th label gets ``label_colour(i)``.
    Drawn with numpy and Pillow (a few milliseconds; a matplotlib figure per case cost more
    than the prediction itself).

    Args:
        image: the 3D image (one channel).
        labels: the 3D predicted label map, same shape.
        spacing: voxel size in mm along each axis.
        label_values: the foreground label values to draw, in label order.

    Returns:
        The PNG file's bytes.
    """
    from PIL import Image

    if image.ndim != 3 or labels.shape != image.shape:
        raise ValueError(f"expected two 3D arrays of one shape, got {image.shape} and {labels.shape}")
    if len(spacing) != 3:
        raise ValueError(f"spacing needs 3 values, got {tuple(spacing)}")
    sx, sy, sz = (float(s) for s in spacing)
    cx, cy, cz = _centre(np.isin(labels, list(label_values)))
    lo, hi = (float(v) for v in np.percentile(image, [1, 99]))
    if hi <= lo:
        hi = lo + 1.0  # a constant image: any window shows it
    width, height = THUMB_SIZE_PX
    box = (width // 3 - 4, height - 4)
    canvas = np.zeros((height, width, 3), np.float32)
    colours = [np.array(_rgb(label_colour(i)), np.float32) for i in range(len(label_values))]
    for k, (where, col_mm, row_mm) in enumerate([(np.s_[:, :, cz], sx, sy), (np.s_[:, cy, :], sx, sz),
                                                  (np.s_[cx, :, :], sy, sz)]):
        size = _panel(image[where], col_mm, row_mm, box)
        # (columns, rows) -> an image whose first row is the top: the second array axis runs upwards.
        grey = np.clip((image[where].astype(np.float32) - lo) / (hi - lo), 0, 1)
        grey = np.asarray(Image.fromarray(np.flipud(grey.T)).resize(size, Image.BILINEAR))
        rgb = np.repeat(grey[..., None], 3, axis=-1)
        plane = Image.fromarray(np.flipud(labels[where].T).astype(np.int32))
        plane = np.asarray(plane.resize(size, Image.NEAREST))
        for value, colour in zip(label_values, colours):
            mask = plane == value
            rgb[mask] = (1 - FILL_ALPHA) * rgb[mask] + FILL_ALPHA * colour
            rgb[_edge(mask)] = colour
        top, left = (height - size[1]) // 2, k * (width // 3) + (width // 3 - size[0]) // 2
        canvas[top : top + size[1], left : left + size[0]] = rgb
    buffer = io.BytesIO()
    Image.fromarray((np.clip(canvas, 0, 1) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _rgb(colour: str) -> tuple[float, float, float]:
    return tuple(int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5))  # type: ignore[return-value]


def _number(value: Any) -> float | None:
    """A finite float, or None for null, NaN (a true Dice of an empty pair) and anything not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _ml(value: float) -> str:
    # Hippocampi are a few mL, livers over a thousand: as many decimals as keep three significant digits.
    return f"{value:,.{3 if abs(value) < 10 else 1 if abs(value) < 1000 else 0}f}"


def _num_cell(value: Any, fmt: str = "dice") -> str:
    number = _number(value)
    if number is None:
        return f'<td class="num missing" data-value="">{MISSING}</td>'
    text = _ml(number) if fmt == "ml" else f"{number:.3f}"
    return f'<td class="num" data-value="{number!r}">{text}</td>'


def _estimate_cell(record: Mapping[str, Any], value: Any) -> str:
    """An estimated Dice cell; a withheld estimate (input unlike the training data) says so, and why on hover."""
    withheld = record.get("estimate_withheld")
    number = _number(value)
    if withheld and number is None:
        return f'<td class="num missing withheld" data-value="" title="{html.escape(str(withheld))}">withheld</td>'
    if number is not None and _unreliable(record):
        # Two decimals and "~": a rough indication, not a measurement (sorting still uses the full value).
        return f'<td class="num indicative" data-value="{number!r}" title="{INDICATIVE}">~{number:.2f}</td>'
    return _num_cell(value)


def _unreliable(record: Mapping[str, Any]) -> bool:
    """The record's model has an estimate known not to be reliable (unknown reliability is not flagged as such)."""
    quality = record.get("estimate_quality")
    return isinstance(quality, Mapping) and quality.get("reliable") is False


def _label_field(record: Mapping[str, Any], label: str, field: str) -> Any:
    entry = (record.get("labels") or {}).get(label)
    return entry.get(field) if isinstance(entry, Mapping) else None


def _b64_img(png: bytes, alt: str, css_class: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="{css_class}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _columns(labels: Sequence[str], evaluated: bool) -> list[tuple[str, str]]:
    """(data-key, header text) of the sortable columns, in table order."""
    columns = [("case", "case"), ("flagged", "flagged")]
    columns += [(f"volume:{label}", f"{label} volume (mL)") for label in labels]
    for label in labels:
        columns.append((f"estimated_dice:{label}", f"{label} est. Dice"))
        if evaluated:
            columns.append((f"true_dice:{label}", f"{label} true Dice"))
    columns.append(("estimated_mean_dice", "est. mean Dice"))
    if evaluated:
        columns.append(("true_mean_dice", "true mean Dice"))
    return columns


def _row(record: Mapping[str, Any], labels: Sequence[str], evaluated: bool, thumbnail: bytes | None) -> str:
    case = str(record.get("case", ""))
    flagged = bool(record.get("flagged"))
    if thumbnail:
        thumb = f"<td>{_b64_img(thumbnail, f'{case}: axial, coronal, sagittal', 'thumb')}</td>"
    else:
        thumb = '<td class="noimg"><div class="placeholder">no image</div></td>'
    flag = '<span class="flag">&#9873; yes</span>' if flagged else "no"
    cells = [thumb, f'<td class="case" data-value="{html.escape(case)}">{html.escape(case)}</td>',
             f'<td class="flagcell" data-value="{int(flagged)}">{flag}</td>']
    cells += [_num_cell(_label_field(record, label, "volume_ml"), "ml") for label in labels]
    for label in labels:
        cells.append(_estimate_cell(record, _label_field(record, label, "estimated_dice")))
        if evaluated:
            cells.append(_num_cell(_label_field(record, label, "true_dice")))
    cells.append(_estimate_cell(record, record.get("estimated_mean_dice")))
    if evaluated:
        cells.append(_num_cell(record.get("true_mean_dice")))
    reasons = "".join(f"<li>{html.escape(str(reason))}</li>" for reason in record.get("reasons") or [])
    cells.append(f'<td class="reasons">{f"<ul>{reasons}</ul>" if reasons else ""}</td>')
    row_class = ' class="flagged"' if flagged else ""
    return f'<tr data-case="{html.escape(case)}" data-flagged="{str(flagged).lower()}"{row_class}>{"".join(cells)}</tr>'


def volume_plot(records: Sequence[Mapping[str, Any]], label: str) -> bytes:
    """A PNG (420x200 px): histogram of one label's volumes over the batch, flagged cases marked below it.

    Args:
        records: the case records.
        label: the label name (a key of the records' ``labels``).

    Returns:
        The PNG file's bytes.
    """
    volumes = [(_number(_label_field(r, label, "volume_ml")), bool(r.get("flagged"))) for r in records]
    all_ml = np.array([v for v, _ in volumes if v is not None])
    flagged_ml = np.array([v for v, flagged in volumes if v is not None and flagged])
    fig = _figure(VOLUME_PLOT_SIZE_PX)
    ax = fig.subplots()
    if all_ml.size:
        ax.hist(all_ml, bins=np.histogram_bin_edges(all_ml, bins="auto"), color="0.6", edgecolor="white", label="all")
        if flagged_ml.size:
            # Markers just under the axis: a flagged case shows even in a bin of hundreds.
            ax.plot(flagged_ml, np.zeros_like(flagged_ml), linestyle="none", marker="^", markersize=8,
                    color=FLAG_COLOUR, clip_on=False, label="flagged")
        ax.legend(loc="upper right", fontsize="small", frameon=False)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")
    ax.set_title(f"{label} volume (mL), n={all_ml.size}", fontsize="medium")
    ax.set_ylabel("cases")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.15, top=0.87)
    return _png(fig)


STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 6px;vertical-align:middle}
th{background:#f0f0f0;position:sticky;top:0}
th.sortable{cursor:pointer;user-select:none}
th[aria-sort=ascending]::after{content:" \\25B2"}
th[aria-sort=descending]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.missing{color:#999;text-align:center}
tr.flagged{background:#fdecea}
.flag{color:#b00;font-weight:bold}
.placeholder{width:360px;height:130px;display:flex;align-items:center;justify-content:center;
background:#eee;color:#777;border:1px dashed #aaa}
td.reasons ul{margin:0;padding-left:1.2em}
.plots img{margin:4px;border:1px solid #ddd}
td.indicative{color:#777;font-style:italic}
p.unreliable{color:#b00}
"""

# Numbers compare as numbers, text naturally ("case_10" after "case_9"); empty cells stay last either way.
SCRIPT = """
(function () {
  var table = document.getElementById("__TABLE_ID__");
  var body = table.tBodies[0];
  var headers = table.tHead.rows[0].cells;
  function value(row, col) { return row.cells[col].getAttribute("data-value") || ""; }
  Array.prototype.forEach.call(headers, function (th, col) {
    if (!th.classList.contains("sortable")) { return; }
    th.addEventListener("click", function () {
      var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (r1, r2) {
        var a = value(r1, col), b = value(r2, col);
        if (a === "" || b === "") { return (a === "") - (b === ""); }
        var x = Number(a), y = Number(b);
        var c = isFinite(x) && isFinite(y) ? x - y : a.localeCompare(b, undefined, {numeric: true});
        return dir * c;
      });
      rows.forEach(function (row) { body.appendChild(row); });
      Array.prototype.forEach.call(headers, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
    });
  });
})();
""".replace("__TABLE_ID__", TABLE_ID)


def _models(records: Sequence[Mapping[str, Any]]) -> str:
    seen: list[str] = []
    for record in records:
        model = record.get("model") or {}
        name = f"{model.get('name', 'unknown')} version {model.get('version', '?')}" if model else "unknown"
        if name not in seen:
            seen.append(name)
    return ", ".join(seen) or "none"


def estimate_statements(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """One HTML paragraph per model of the batch: how well its estimated Dice ranks unseen cases, and whether to trust it.

    Args:
        records: the case records (those without ``estimate_quality``, no calibration, say nothing).

    Returns:
        The paragraphs, in the order the models first appear.
    """
    by_model: dict[str, Mapping[str, Any]] = {}
    for record in records:
        quality = record.get("estimate_quality")
        if isinstance(quality, Mapping):
            model = record.get("model") or {}
            by_model.setdefault(f"{model.get('name', 'unknown')} version {model.get('version', '?')}", quality)
    paragraphs = []
    for model, quality in by_model.items():
        rho, cases = _number(quality.get("rho")), _number(quality.get("cases"))
        on = f"{cases:.0f} validation cases" if cases is not None else "validation cases"
        ranks = (f"the estimate ranks cases with rho {rho:.2f} (out of sample, {on})" if rho is not None
                 else f"how the estimate ranks unseen cases is not known ({on})")
        text = f"Estimated Dice of {html.escape(model)}: {ranks}."
        if quality.get("reliable") is False:
            why = [str(w) for w in quality.get("why_not") or []] or [_why_not(rho)]
            paragraphs.append(f'<p class="unreliable">{text} <b>The estimated Dice is not reliable for this model</b>: '
                              f"{html.escape('; '.join(why))}; treat estimates as indicative (shown as ~0.xx).</p>")
        elif quality.get("reliable") is None:
            paragraphs.append(f'<p class="unassessed">{text} Its reliability was not assessed (the model was calibrated '
                              "before the out-of-sample check).</p>")
        else:
            paragraphs.append(f'<p class="reliable">{text}</p>')
    return paragraphs


def _why_not(rho: float | None) -> str:
    """The reason to show for an unreliable estimate whose record lists none (written by hand or by other tools)."""
    if rho is None or rho < RELIABLE_MIN_RHO:
        return f"rho {'unknown' if rho is None else f'{rho:.2f}'} < {RELIABLE_MIN_RHO}"
    return "it did not meet the check on the validation cases"


def write_report(records: Sequence[Mapping[str, Any]], path: Path, thumbnails: Mapping[str, bytes], title: str) -> Path:
    """Write the batch's self-contained HTML report: summary, a sortable table of cases, volume plots.

    Rows come flagged cases first, then by estimated mean Dice ascending (cases without an
    estimate after those with one). Columns: thumbnail, case, flagged, per-label volume and
    estimated Dice, estimated mean Dice, and when any record has ``true_dice`` (evaluate) the
    true Dice beside each estimate, then the reasons (a withheld estimate reads "withheld", why on hover
    and among the reasons). Clicking a header sorts by it, again reverses. Under the summary,
    :func:`estimate_statements`; an unreliable model's estimates read "~0.61".

    Args:
        records: the case records (see the case record schema); labels are the keys of the
            first record's ``labels``, in their order.
        path: the ``report.html`` to write (atomically).
        thumbnails: case name -> PNG bytes (``overlay_thumbnail``); a case without one shows a "no image" cell.
        title: the report's title.

    Returns:
        ``path``.
    """
    labels = list((records[0].get("labels") or {}) if records else [])
    evaluated = any("true_mean_dice" in r or any("true_dice" in (entry or {}) for entry in (r.get("labels") or {}).values())
                    for r in records)
    ordered = sorted(records, key=review_order)
    n_flagged = sum(bool(r.get("flagged")) for r in records)

    headers = ['<th title="axial, coronal, sagittal">thumbnail</th>']
    headers += [f'<th class="sortable" data-key="{html.escape(key)}">{html.escape(text)}</th>'
                for key, text in _columns(labels, evaluated)]
    headers.append("<th>reasons</th>")
    rows = [_row(r, labels, evaluated, thumbnails.get(str(r.get("case", "")))) for r in ordered]
    plots = [_b64_img(volume_plot(records, label), f"{label} volume distribution", "volplot") for label in labels]

    document = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<link rel="icon" href="data:,"><style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="summary"><b>{len(records)}</b> cases, <b class="{'flag' if n_flagged else ''}">{n_flagged}</b> flagged;
model: {html.escape(_models(records))}{'; with reference (true Dice)' if evaluated else ''}.
Click a column header to sort, again to reverse.</p>
<div class="estimate-quality">{"".join(estimate_statements(records))}</div>
<table id="{TABLE_ID}"><thead><tr>{"".join(headers)}</tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
<h2>Volume distribution</h2>
<div class="plots">{"".join(plots)}</div>
<script>{SCRIPT}</script>
</body></html>
"""
    write_text_atomic(path, document.encode("ascii", "xmlcharrefreplace").decode("ascii"))
    return path
