"""The batch report, opened in a real headless Chromium: rows, order, sorting, escaping, images; and the thumbnails.

Thumbnails are drawn from real hippocampus MRI and reference labels (standing in for predictions).
One Chromium is shared by the module; every check that needs it skips when it is not installed.
"""

from __future__ import annotations

import copy
import io
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.quality.report import TABLE_ID, THUMB_SIZE_PX, overlay_thumbnail, write_report
from tests.conftest import HIPPOCAMPUS
from tests.quality.report_browser import check_report, table_rows

LABELS = {"anterior": 1, "posterior": 2}
# (estimated Dice per label, flagged, reasons) of the six cases, in file order.
CASES = [
    ((0.874, 0.861), False, []),
    ((0.61, 0.83), True, ["estimated Dice of anterior 0.61 is below 0.80"]),
    ((None, None), True, ["spacing 0.43x0.43x6.5 mm, trained on 1.0x1.0x1.0 mm", "no calibration for this model"]),
    ((0.79, 0.75), True, ["estimated Dice of anterior 0.79 is below 0.80", "estimated Dice of posterior 0.75 is below 0.80"]),
    ((0.91, 0.93), False, []),
    ((None, None), False, []),
]
NO_THUMBNAIL = 4  # this case's thumbnail is left out: its row must show the placeholder


def _load(name: str) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    nib = pytest.importorskip("nibabel")
    image = nib.load(HIPPOCAMPUS / "imagesTr" / name)
    labels = np.asarray(nib.load(HIPPOCAMPUS / "labelsTr" / name).dataobj).astype(np.uint8)
    return np.asarray(image.dataobj, dtype=np.float32), labels, tuple(float(z) for z in image.header.get_zooms()[:3])


@pytest.fixture(scope="module")
def scans() -> list[tuple[str, np.ndarray, np.ndarray, tuple[float, ...]]]:
    """(case, image, labels, spacing) of the first six real hippocampus cases."""
    folder = HIPPOCAMPUS / "imagesTr"
    if not folder.is_dir() or not (HIPPOCAMPUS / "labelsTr").is_dir():
        pytest.skip(f"real hippocampus data not found at {HIPPOCAMPUS} (see ../shared/data/README.md)")
    names = sorted(p.name for p in folder.glob("*.nii.gz"))[: len(CASES)]
    return [(name.removesuffix(".nii.gz"), *_load(name)) for name in names]


@pytest.fixture(scope="module")
def batch(scans) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """Records shaped like the pipeline's case records, with real volumes, and real overlay thumbnails."""
    records, thumbnails = [], {}
    for i, ((case, image, labels, spacing), (dice, flagged, reasons)) in enumerate(zip(scans, CASES)):
        voxel_ml = math.prod(spacing) / 1000
        per_label = {}
        for (name, value), estimate in zip(LABELS.items(), dice):
            voxels = int((labels == value).sum())
            per_label[name] = {"value": value, "voxels": voxels, "volume_ml": voxels * voxel_ml, "estimated_dice": estimate}
        records.append({
            "case": case, "model": {"name": "hippocampus-3d", "version": "3"}, "spacing_mm": list(spacing),
            "shape": list(image.shape), "voxel_volume_ml": voxel_ml, "labels": per_label,
            "estimated_mean_dice": None if dice[0] is None else sum(dice) / len(dice),
            "conformity": {"conforms": True, "reasons": []}, "flagged": flagged, "reasons": reasons,
            "files": {"mask": f"{case}.nii.gz", "seg": None, "sr": None},
        })
        if i != NO_THUMBNAIL:
            thumbnails[case] = overlay_thumbnail(image, labels, spacing, list(LABELS.values()))
    return records, thumbnails


def _expected_order(records: list[dict[str, Any]]) -> list[str]:
    by_case = {r["case"]: r for r in records}
    cases = [r["case"] for r in records]
    # Flagged 1 (mean 0.72), 3 (0.77), 2 (no estimate); then 0 (0.8675), 4 (0.92), 5 (no estimate).
    order = [cases[i] for i in (1, 3, 2, 0, 4, 5)]
    assert [by_case[c]["flagged"] for c in order] == [True] * 3 + [False] * 3
    return order


def _headers(driver: Any) -> list[str]:
    return [th.text.strip(" \u25b2\u25bc") for th in driver.find_elements("css selector", f"#{TABLE_ID} thead th")]


def _row(driver: Any, case: str) -> Any:
    return next(r for r in driver.find_elements("css selector", f"#{TABLE_ID} tbody tr") if r.get_attribute("data-case") == case)


def test_report_renders_one_row_per_case_flagged_first(batch, driver, tmp_path: Path) -> None:
    records, thumbnails = batch
    path = write_report(records, tmp_path / "report.html", thumbnails, "Hippocampus batch")
    seen = check_report(path, driver)  # no console error, every image decoded, not blank
    assert seen["cases"] == _expected_order(records)
    assert seen["flagged"] == [True, True, True, False, False, False]
    assert Image.open(io.BytesIO(seen["screenshot"])).size[0] > 0

    thumbs = driver.find_elements("css selector", f"#{TABLE_ID} img.thumb")
    assert len(thumbs) == len(records) - 1
    assert all(int(img.get_property("naturalWidth")) == THUMB_SIZE_PX[0] for img in thumbs)
    assert len(driver.find_elements("css selector", "img.volplot")) == len(LABELS)  # one plot per label
    missing = _row(driver, records[NO_THUMBNAIL]["case"])
    assert not missing.find_elements("tag name", "img") and "no image" in missing.text

    summary = driver.find_element("css selector", ".summary").text
    assert "6 cases" in summary and "3 flagged" in summary and "hippocampus-3d version 3" in summary
    for record in records:
        row = _row(driver, record["case"])
        assert [li.text for li in row.find_elements("css selector", "td.reasons li")] == record["reasons"]
        assert ("\u2691 yes" in row.text) == record["flagged"]
    assert _row(driver, records[5]["case"]).find_elements("css selector", "td.missing")[0].text == "\u2013"
    assert not any("true" in h for h in _headers(driver))  # no reference: no true Dice columns


def _broken_image(html: str) -> str:
    start = html.index("data:image/png;base64,") + len("data:image/png;base64,")
    return html[:start] + "iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB" + html[html.index('"', start):]  # a truncated PNG


@pytest.mark.parametrize(("breakage", "message"), [
    (_broken_image, "images that did not load"),
    (lambda html: html.replace("</body>", "<script>noSuchFunction();</script></body>"), "console errors"),
    (lambda html: '<html><body><table id="cases"><tbody></tbody></table></body></html>', "renders blank"),
], ids=["corrupt-thumbnail", "script-error", "blank-page"])
def test_check_report_fails_on_a_broken_report(batch, driver, tmp_path: Path, breakage, message: str) -> None:
    records, thumbnails = batch
    path = write_report(records, tmp_path / "report.html", thumbnails, "Hippocampus batch")
    check_report(path, driver)  # intact, it passes: the breakage alone must make it fail
    path.write_text(breakage(path.read_text()))
    with pytest.raises(AssertionError, match=message):
        check_report(path, driver)


def test_clicking_a_header_sorts_and_a_second_click_reverses(batch, driver, tmp_path: Path) -> None:
    records, thumbnails = batch
    check_report(write_report(records, tmp_path / "report.html", thumbnails, "Hippocampus batch"), driver)
    cases = sorted(r["case"] for r in records)

    header = driver.find_element("css selector", f'#{TABLE_ID} th[data-key="case"]')
    header.click()
    assert table_rows(driver)[0] == cases and header.get_attribute("aria-sort") == "ascending"
    header.click()
    assert table_rows(driver)[0] == cases[::-1] and header.get_attribute("aria-sort") == "descending"

    # Means 0.72, 0.77, 0.8675, 0.92: as text with numeric runs 0.92 would come before 0.8675 (92 < 8675).
    by_mean = sorted((r for r in records if r["estimated_mean_dice"] is not None), key=lambda r: r["estimated_mean_dice"])
    without = [r["case"] for r in records if r["estimated_mean_dice"] is None]
    driver.find_element("css selector", f'#{TABLE_ID} th[data-key="estimated_mean_dice"]').click()
    shown = table_rows(driver)[0]
    assert shown[:4] == [r["case"] for r in by_mean] and sorted(shown[4:]) == sorted(without)  # no estimate: last
    driver.find_element("css selector", f'#{TABLE_ID} th[data-key="estimated_mean_dice"]').click()
    shown = table_rows(driver)[0]
    assert shown[:4] == [r["case"] for r in by_mean[::-1]] and sorted(shown[4:]) == sorted(without)


def test_evaluated_records_show_true_dice_beside_the_estimates(batch, driver, tmp_path: Path) -> None:
    records, thumbnails = batch
    evaluated = copy.deepcopy(records)
    for i, record in enumerate(evaluated):
        true = (0.8 + i / 100, math.nan if i == 2 else 0.7 + i / 100)  # NaN: a label absent from both masks
        for entry, value in zip(record["labels"].values(), true):
            entry["true_dice"] = value
        record["true_mean_dice"] = true[0] if i == 2 else sum(true) / 2
    check_report(write_report(evaluated, tmp_path / "report.html", thumbnails, "Evaluated batch"), driver)

    headers = _headers(driver)
    for label in LABELS:
        assert headers.index(f"{label} true Dice") == headers.index(f"{label} est. Dice") + 1
    assert headers.index("true mean Dice") == headers.index("est. mean Dice") + 1
    cells = [td.text for td in _row(driver, evaluated[2]["case"]).find_elements("tag name", "td")]
    assert cells[headers.index("anterior true Dice")] == "0.820"
    assert cells[headers.index("posterior true Dice")] == "\u2013"
    assert cells[headers.index("anterior est. Dice")] == "\u2013"
    assert cells[headers.index("true mean Dice")] == "0.820"


def test_markup_in_names_and_reasons_is_shown_as_text(batch, driver, tmp_path: Path) -> None:
    records, thumbnails = batch
    hostile = copy.deepcopy(records)
    name = '<script>window.injected = 1; console.error("injected")</script>"&<b>x'
    reason = """<img src="nowhere.png" onerror="window.injected = 2; console.error('injected')"> & 'quoted'"""
    hostile[0]["case"], hostile[0]["reasons"], hostile[0]["flagged"] = name, [reason], True
    hostile[1]["model"] = {"name": "<i>model</i>", "version": "<script>window.injected = 3</script>"}
    pictures = {**thumbnails, name: thumbnails[records[0]["case"]]}  # the name goes into the thumbnail's alt text too
    path = write_report(hostile, tmp_path / "report.html", pictures, "<script>window.injected = 4</script>")
    seen = check_report(path, driver)  # an injected script or image would log an error here
    assert driver.execute_script("return window.injected === undefined && document.images.length") == len(records) - 1 + 2
    assert name in seen["cases"]
    row = _row(driver, name)
    assert row.find_element("css selector", "td.case").text == name
    assert [li.text for li in row.find_elements("css selector", "td.reasons li")] == [reason]
    assert "<script>window.injected = 3</script>" in driver.find_element("css selector", ".summary").text
    assert driver.title == "<script>window.injected = 4</script>"


def _coloured(rgb: np.ndarray, channel: int) -> np.ndarray:
    """Pixels where one channel stands well above both others: a label overlay; grey never does."""
    others = np.delete(rgb, channel, axis=-1)
    return (rgb[..., channel] - others.max(axis=-1)) > 0.2


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255


def test_overlay_thumbnail_colours_each_label_where_it_is(scans) -> None:
    _, image, labels, spacing = scans[0]
    rgb = _decode(overlay_thumbnail(image, labels, spacing, [1, 2]))
    assert rgb.shape == (THUMB_SIZE_PX[1], THUMB_SIZE_PX[0], 3)
    assert rgb.std() > 0.05  # the anatomy shows
    red, green = _coloured(rgb, 0), _coloured(rgb, 1)  # label 1, label 2
    assert red.sum() > 50 and green.sum() > 50 and not (red & green).any()

    only_posterior = np.where(labels == 2, labels, 0)
    rgb = _decode(overlay_thumbnail(image, only_posterior, spacing, [1, 2]))
    assert _coloured(rgb, 0).sum() == 0 and _coloured(rgb, 1).sum() > 50

    rgb = _decode(overlay_thumbnail(image, np.zeros_like(labels), spacing, [1, 2]))
    assert rgb.std() > 0.05 and (rgb.max(axis=-1) - rgb.min(axis=-1)).max() < 0.05  # grey only: no overlay at all

    # Where: a slab of label 1 over the lowest quarter of the first axis, against the panel a full mask fills.
    full = _coloured(_decode(overlay_thumbnail(image, np.ones_like(labels), spacing, [1])), 0)
    slab = np.zeros_like(labels)
    slab[: image.shape[0] // 4] = 1
    part = _coloured(_decode(overlay_thumbnail(image, slab, spacing, [1])), 0)
    third = THUMB_SIZE_PX[0] // 3
    panel = np.nonzero(full[:, :third].any(axis=0))[0]  # the axial panel's columns
    drawn = np.nonzero(part[:, :third].any(axis=0))[0]
    assert drawn.size and drawn.min() >= panel.min() and drawn.max() <= panel.min() + 0.3 * (panel.max() - panel.min())
    assert part[:, 2 * third:].sum() > 50  # the sagittal slice goes through the slab's centre, not the volume's


def test_overlay_thumbnail_keeps_the_voxel_aspect(scans) -> None:
    _, image, labels, _ = scans[0]
    full = np.ones_like(labels)

    def coronal_height_over_width(spacing: tuple[float, float, float]) -> float:
        third = THUMB_SIZE_PX[0] // 3
        mask = _coloured(_decode(overlay_thumbnail(image, full, spacing, [1])), 0)[:, third: 2 * third]  # the coronal panel
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        return (np.ptp(rows) + 1) / (np.ptp(cols) + 1)

    nx, _, nz = image.shape
    for spacing in ((1.0, 1.0, 1.0), (1.0, 1.0, 2.5)):
        expected = nz * spacing[2] / (nx * spacing[0])
        assert coronal_height_over_width(spacing) == pytest.approx(expected, rel=0.1)


def test_no_records_still_render(driver, tmp_path: Path) -> None:
    path = write_report([], tmp_path / "report.html", {}, "Empty batch")
    seen = check_report(path, driver)
    assert seen["cases"] == [] and re.search(r"\b0 cases", driver.find_element("css selector", ".summary").text)


def _calibrated_records(reliable: bool | None) -> list[dict[str, Any]]:
    """Two cases' records from a stored calibration whose out-of-sample figures pass the bar, miss it, or are absent."""
    from pipeline.quality import Calibration, Conformity, case_record
    from pipeline.quality.calibration import LabelFit

    # Estimated Dice 0.8 + 0.5 (soft_dice - 0.8): 0.775 and 0.85, both above the threshold 0.7 (no flag).
    fit = LabelFit(("soft_dice", "expected_error", "voxels"), (0.8, -2.0, 6.0), (0.1, 0.5, 0.5), (0.05, 0.0, 0.0), 0.8, 1.0)
    figures = {None: {}, True: {"spearman_oos": 0.62, "worst5_caught": 4.0, "flagged_share": 0.19},
               False: {"spearman_oos": 0.25, "worst5_caught": 1.0, "flagged_share": 0.19}}[reliable]
    calibration = Calibration({1: fit, 2: fit}, 0.7, {"cases": 42.0, "spearman": 0.7, "spearman_loo": 0.48, **figures})
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[2:5], labels[5:8] = 1, 2
    records = []
    for i, soft in enumerate((0.75, 0.9)):
        signals = {v: {"soft_dice": soft, "expected_error": 0.1, "voxels": 300.0} for v in (1, 2)}
        records.append(case_record(f"case{i}", labels, np.eye(4), {v: n for n, v in LABELS.items()}, signals, calibration,
                                   Conformity(True), {"name": "hippocampus-3d", "version": "7"}, {}, {"mask": f"case{i}.nii.gz"}))
    return records


def _text(page: str) -> str:
    """What a reader sees of the page's markup: tags out, entities decoded, whitespace runs as one space."""
    import html

    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", "", page)))


@pytest.mark.parametrize("reliable", [True, False, None], ids=["reliable", "unreliable", "saved-before"])
def test_record_and_report_say_how_far_the_estimate_holds_for_the_model(tmp_path: Path, reliable: bool | None) -> None:
    import csv

    from pipeline.quality import read_record, write_record, write_summary_csv

    records = _calibrated_records(reliable)
    rho = {True: 0.62, False: 0.25, None: 0.48}[reliable]  # without the new figures: the leave-one-out rho
    stored = read_record(write_record(records[0], tmp_path / "case0.json"))
    assert stored is not None
    quality = stored["estimate_quality"]
    assert (quality["rho"], quality["cases"], quality["reliable"]) == (rho, 42, reliable)
    assert (quality["why_not"] == []) == (reliable is not False)
    assert not any(r["flagged"] for r in records)  # the flag is not the estimate's verdict on itself

    page = write_report(records, tmp_path / "report.html", {}, "Batch").read_text()
    text = _text(page)
    assert f"the estimate ranks cases with rho {rho:.2f} (out of sample, 42 validation cases)" in text
    assert ("The estimated Dice is not reliable for this model: rho 0.25 < 0.5" in text) == (reliable is False)
    assert ("treat estimates as indicative" in text) == (reliable is False)
    assert ("reliability was not assessed" in text) == (reliable is None)
    estimates = [e["estimated_dice"] for r in records for e in r["labels"].values()]
    estimates += [r["estimated_mean_dice"] for r in records]
    assert len(set(estimates)) == 2 and all(e is not None for e in estimates)
    indicative = re.findall(r'<td class="num indicative"[^>]*>([^<]*)</td>', page)
    confident = re.findall(r'<td class="num" data-value="[^"]*">([^<]*)</td>', page)
    if reliable is False:  # every estimate marked as a rough figure, none printed as a measurement
        assert sorted(indicative) == sorted(f"~{e:.2f}" for e in estimates)
        assert not any(f"{e:.3f}" in confident for e in estimates)
    else:
        assert indicative == [] and all(f"{e:.3f}" in confident for e in estimates)

    with open(write_summary_csv(records, tmp_path / "summary.csv"), newline="") as fp:
        rows = list(csv.DictReader(fp))
    assert {r["estimate_reliable"] for r in rows} == {{True: "yes", False: "no", None: ""}[reliable]}
    assert {float(r["estimate_rho"]) for r in rows} == {rho}


def test_a_reader_sees_the_unreliable_estimate_said_plainly(driver, tmp_path: Path) -> None:
    records = _calibrated_records(False)
    check_report(write_report(records, tmp_path / "report.html", {}, "Batch"), driver)
    said = driver.find_element("css selector", ".estimate-quality").text
    assert "not reliable for this model" in said and "rho 0.25 < 0.5" in said
    cells = _row(driver, "case0").find_elements("css selector", "td.indicative")
    expected = [f"~{e['estimated_dice']:.2f}" for e in records[0]["labels"].values()] + [
        f"~{records[0]['estimated_mean_dice']:.2f}"]
    assert [c.text for c in cells] == expected
