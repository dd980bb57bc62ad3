"""The pieces of the quality estimate: the spread of the mirrored passes, the signals, the calibration,
the volumes on a real oblique, anisotropic series."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pydicom
import pytest
import torch

from pipeline.inference import SlidingWindowInferer, WindowSettings
from pipeline.quality import Calibration, fit_calibration, label_volumes, quality_signals
from pipeline.quality.records import WITHHELD
from tests.conftest import dicom_series


class _Net(torch.nn.Module):
    """A small, deterministic, non-symmetric convolution: flips and windows disagree where the input varies."""

    spatial_dims = 3

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv3d(1, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * 4


def test_spread_is_the_standard_deviation_of_the_mirrored_passes() -> None:
    net = _Net().eval()
    image = torch.randn(1, 16, 16, 16)
    engine = SlidingWindowInferer(net, [16, 16, 16], WindowSettings(overlap=0.0, mode="constant", mirror=True,
                                                                     batch_size=4, compile="off"), torch.device("cpu"))
    logits, spread = engine.with_spread(image)
    # One window covers the volume: the passes are exactly the 8 flips, each flipped back.
    passes = []
    with torch.no_grad():
        for r in range(4):
            for axes in itertools.combinations([1, 2, 3], r):
                flipped = torch.flip(image, axes) if axes else image
                out = net(flipped[None])[0]
                passes.append(torch.flip(out, axes) if axes else out)
    stack = torch.stack(passes)
    assert torch.allclose(logits, stack.mean(0), atol=1e-4)
    expected = ((stack - stack.mean(0)) ** 2).sum(1).mean(0).sqrt()
    assert torch.allclose(spread, expected, atol=1e-3)
    assert spread.max() > 0.1
    assert torch.allclose(engine(image), logits)  # asking for the spread does not change the prediction


def test_a_single_pass_has_no_spread() -> None:
    engine = SlidingWindowInferer(_Net().eval(), [16, 16, 16], WindowSettings(overlap=0.0, mirror=False, compile="off"),
                                  torch.device("cpu"))
    logits, spread = engine.with_spread(torch.randn(1, 16, 16, 16))
    # Zero up to float32 rounding of E|l|^2 - |E l|^2 (logits of norm ~10 here).
    assert float(spread.max()) < 1e-3 * float(logits.norm(dim=0).max())


def test_signals_rise_with_uncertainty() -> None:
    labels = torch.zeros(20, 20, 20, dtype=torch.long)
    labels[5:15, 5:15, 5:15] = 1
    sure = torch.nn.functional.one_hot(labels, 2).permute(3, 0, 1, 2).float() * 0.98 + 0.01
    unsure = sure * 0.6 + 0.2
    spread = torch.zeros(20, 20, 20)
    a = quality_signals(sure, labels, spread, [1])[1]
    b = quality_signals(unsure, labels, spread + 1.0, [1])[1]
    assert a["voxels"] == b["voxels"] == 1000
    assert b["boundary_entropy"] > a["boundary_entropy"] and b["spread"] > a["spread"]
    assert a["soft_dice"] > b["soft_dice"] and b["expected_error"] > a["expected_error"]
    empty = quality_signals(sure, torch.zeros_like(labels), spread, [1])[1]
    assert empty["voxels"] == 0 and math.isnan(empty["spread"])


def _synthetic(n: int, seed: int = 0) -> tuple[list, list]:
    """Cases whose true Dice follows the model's own expected Dice; the other signals carry nothing."""
    rs = np.random.RandomState(seed)
    soft = rs.uniform(0.6, 0.95, n)
    signals = [{1: {"soft_dice": float(s), "expected_error": float(rs.uniform(0.1, 0.3)), "voxels": float(rs.uniform(900, 1100)),
                    "spread": 0.5, "boundary_entropy": 0.4}} for s in soft]
    dice = [{1: float(0.1 + 0.9 * s + rs.normal(0, 0.01))} for s in soft]
    return signals, dice


def _held_out_lowest(signals: list, dice: list) -> list[float]:
    """Each case's lowest estimate by a calibration fitted on all the other cases (public API only)."""
    lowest = []
    for i in range(len(signals)):
        others = fit_calibration(signals[:i] + signals[i + 1:], dice[:i] + dice[i + 1:], min_expected_dice=0.0)
        lowest.append(min(v for v in others.estimate(signals[i]).values() if v is not None))
    return lowest


def _noise(n: int, seed: int) -> tuple[list, list]:
    """Cases whose true Dice has nothing to do with any signal: whatever a fit finds there it found in the noise."""
    rs = np.random.RandomState(seed)
    signals = [{1: {"soft_dice": float(rs.uniform(0.6, 0.95)), "expected_error": float(rs.uniform(0.05, 0.4)),
                    "voxels": float(rs.uniform(500, 2000))}} for _ in range(n)]
    dice = [{1: float(rs.uniform(0.5, 0.95))} for _ in range(n)]
    return signals, dice


def test_calibration_ranks_unseen_cases() -> None:
    signals, dice = _synthetic(40)
    cal = fit_calibration(signals, dice)
    assert cal.validation["spearman_loo"] > 0.9 and cal.validation["spearman"] > 0.9
    fit = cal.labels[1]
    weights = dict(zip(fit.features, fit.weights))
    assert weights["soft_dice"] > 0.05 and abs(weights["expected_error"]) < 0.02 and abs(weights["voxels"]) < 0.02
    low, high = ({"soft_dice": s, "expected_error": 0.2, "voxels": 1000.0} for s in (0.65, 0.9))
    assert fit.estimate(low) < fit.estimate(high)
    assert fit.estimate(high) == pytest.approx(0.1 + 0.9 * 0.9, abs=0.02)
    # Far outside the fitted range the estimate stays a Dice.
    assert fit.estimate({"soft_dice": 5.0, "expected_error": 0.2, "voxels": 1000.0}) == 1.0
    # The chosen threshold flags the configured share of the validation cases, each estimated by a fit without it.
    lowest = _held_out_lowest(signals, dice)
    assert sum(v < cal.min_expected_dice for v in lowest) == 8  # 19 % of 40, rounded down by the quantile
    assert cal.validation["flagged_share"] == pytest.approx(8 / 40)
    assert cal.reliable is True and cal.validation["reliable"] == 1.0


def test_on_noise_the_figures_and_the_threshold_come_from_cases_the_fit_did_not_see() -> None:
    signals, dice = _noise(12, seed=1)
    cal = fit_calibration(signals, dice)
    v = cal.validation
    # Fitted to noise, the map ranks its own cases better than cases it did not see.
    assert v["spearman"] > v["spearman_oos"] + 0.2
    assert v["spearman_oos"] == v["spearman_loo"]  # the same leave-one-out estimates, under the old name too
    held_out = _held_out_lowest(signals, dice)
    in_sample = [min(cal.estimate(s).values()) for s in signals]
    assert abs(np.quantile(held_out, 0.19) - np.quantile(in_sample, 0.19)) > 0.01  # the two choices differ here
    assert cal.min_expected_dice == pytest.approx(np.quantile(held_out, 0.19))
    assert not cal.reliable and any("rho" in why for why in cal.shortcomings())


def test_worst_caught_and_flagged_share_on_a_constructed_example() -> None:
    from pipeline.quality.calibration import screening

    nan = math.nan
    lowest = np.array([0.5, 0.9, 0.6, 0.95, 0.62, 0.85, nan, 0.4, 0.92, 0.3])
    true_mean = np.array([0.3, 0.9, 0.8, 0.2, 0.5, 0.85, 0.1, 0.95, 0.4, nan])
    # Below 0.65: cases 0, 2, 4, 7, 9 (5 of 10). The five worst by truth are 6, 3, 0, 8, 4 (case 9 has no
    # truth, so it is not among them); of those, 0 and 4 are below, 6 has no estimate and is not flagged.
    assert screening(lowest, true_mean, 0.65) == (2, 0.5)
    assert screening(lowest, true_mean, 0.0) == (0, 0.0)
    assert screening(lowest, true_mean, 1.0) == (4, 0.9)  # everything with an estimate, so not case 6


def test_the_fit_reports_worst_caught_and_flagged_share_of_its_held_out_estimates() -> None:
    signals, dice = _synthetic(30, seed=4)
    threshold = 0.8
    cal = fit_calibration(signals, dice, min_expected_dice=threshold)
    lowest = _held_out_lowest(signals, dice)
    worst = sorted(range(30), key=lambda i: dice[i][1])[:5]
    assert cal.min_expected_dice == threshold
    assert cal.validation["flagged_share"] == pytest.approx(sum(v < threshold for v in lowest) / 30)
    assert cal.validation["worst5_caught"] == sum(lowest[i] < threshold for i in worst)
    assert 0 < cal.validation["flagged_share"] < 1  # the threshold splits the cases: the check means something


@pytest.mark.parametrize(("figures", "reliable", "why"), [
    ({"spearman_oos": 0.5, "worst5_caught": 3.0, "flagged_share": 0.25}, True, None),
    ({"spearman_oos": 0.49, "worst5_caught": 5.0, "flagged_share": 0.19}, False, "rho 0.49 < 0.5"),
    ({"spearman_oos": math.nan, "worst5_caught": 5.0, "flagged_share": 0.19}, False, "rho nan < 0.5"),
    ({"spearman_oos": 0.8, "worst5_caught": 2.0, "flagged_share": 0.19}, False, "2 of the 5 worst"),
    ({"spearman_oos": 0.8, "worst5_caught": 5.0, "flagged_share": 0.26}, False, "26% of the validation cases"),
], ids=["at-the-bar", "low-rho", "no-rho", "misses-the-worst", "flags-too-many"])
def test_reliable_needs_rho_the_worst_cases_and_a_review_budget(figures: dict, reliable: bool, why: str | None) -> None:
    from pipeline.quality.calibration import RELIABLE_MAX_FLAGGED_SHARE, RELIABLE_MIN_RHO, RELIABLE_MIN_WORST_CAUGHT

    assert (RELIABLE_MIN_RHO, RELIABLE_MIN_WORST_CAUGHT, RELIABLE_MAX_FLAGGED_SHARE) == (0.5, 3, 0.25)  # the bar
    cal = Calibration({}, 0.7, {"cases": 40.0, "spearman": 0.9, "spearman_loo": 0.6, **figures})
    assert cal.reliable is reliable
    assert (why is None) == (cal.shortcomings() == [])
    assert why is None or any(why in s for s in cal.shortcomings())


def test_a_calibration_stored_before_the_out_of_sample_figures_still_loads_and_estimates() -> None:
    from pipeline.quality import Conformity, case_record, estimate_quality

    signals, dice = _synthetic(20)
    cal = fit_calibration(signals, dice)
    stored = cal.to_dict()
    assert {"spearman_oos", "worst5_caught", "flagged_share", "reliable"} <= set(stored["validation"])
    again = Calibration.from_dict(stored)
    assert again is not None and again.validation == cal.validation and again.reliable is cal.reliable
    old = copy.deepcopy(stored)
    old["validation"] = {"cases": 20.0, "spearman": 0.7, "spearman_loo": 0.45}  # what models saved before carry
    loaded = Calibration.from_dict(old)
    assert loaded is not None and loaded.estimate(signals[2]) == pytest.approx(cal.estimate(signals[2]))
    assert loaded.reliable is None and loaded.shortcomings() == [] and loaded.rho == 0.45  # unknown; rho left one out
    assert estimate_quality(loaded) == {"rho": 0.45, "cases": 20, "reliable": None, "why_not": []}
    labels = np.zeros((8, 8, 8), np.uint8)
    labels[2:6, 2:6, 2:6] = 1
    record = case_record("old", labels, np.eye(4), {1: "a"}, {1: signals[2][1]}, loaded, Conformity(True),
                         {"name": "m", "version": "1"}, {}, {"mask": "old.nii.gz"})
    assert record["labels"]["a"]["estimated_dice"] == pytest.approx(cal.estimate(signals[2])[1])
    assert record["estimate_quality"]["reliable"] is None


def test_calibration_round_trips_and_handles_missing_structures() -> None:
    signals, dice = _synthetic(20)
    cal = fit_calibration(signals, dice, min_expected_dice=0.7)
    again = Calibration.from_dict(cal.to_dict())
    assert again is not None and again.min_expected_dice == 0.7
    assert again.estimate(signals[3]) == pytest.approx(cal.estimate(signals[3]))
    empty = {1: {"spread": math.nan, "boundary_entropy": math.nan, "soft_dice": math.nan, "expected_error": math.nan,
                 "voxels": 0.0}}
    assert cal.estimate(empty)[1] == 0.0  # every validation case had the structure: missing it is a failure
    assert Calibration.from_dict(None) is None
    assert fit_calibration(signals[:3], dice[:3]).labels == {}  # too few cases to fit anything


def test_volumes_on_a_real_oblique_anisotropic_series_equal_a_hand_computation() -> None:
    from transforms.readers import load_image

    folder = dicom_series("pgbm003_tumor_mask")
    image = load_image(folder)
    mask = (np.asarray(image.array) > 0).astype(np.uint8)
    volumes = label_volumes(mask, np.asarray(image.meta["affine"]), {0: "background", 1: "tumour"})
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.iterdir())]
    normal = np.cross(*np.asarray(headers[0].ImageOrientationPatient, dtype=float).reshape(2, 3))
    positions = sorted(float(np.dot(normal, np.asarray(h.ImagePositionPatient, dtype=float))) for h in headers)
    row, column = (float(v) for v in headers[0].PixelSpacing)
    by_hand = int(mask.sum()) * row * column * (positions[1] - positions[0]) / 1000
    assert volumes["tumour"]["voxels"] == int(mask.sum()) > 100
    assert volumes["tumour"]["volume_ml"] == pytest.approx(by_hand, rel=1e-4)
    assert "background" not in volumes


def test_the_flag_tells_a_missing_structure_from_a_low_estimate() -> None:
    from pipeline.quality import Conformity, review

    signals, dice = _synthetic(20)
    cal = fit_calibration(signals, dice, min_expected_dice=0.8)
    present = {"a": 1.0}
    assert review({"a": 0.9}, Conformity(True), cal, None, present, {"a": 500}) == []
    assert review({"a": 0.0}, Conformity(True), cal, None, present, {"a": 900}) == ["estimated Dice of a 0.00 is below 0.80"]
    assert review({"a": 0.0}, Conformity(True), cal, None, present, {"a": 0}) == [
        "no a found, though every validation case had one"]
    assert review({"a": 0.9}, Conformity(True), cal, 0.95, present, {"a": 500}) == ["estimated Dice of a 0.90 is below 0.95"]
    # An input unlike the training data has no estimate (withheld), and the reasons say why first.
    assert review({"a": None}, Conformity(False, ["spacing 3 mm"]), cal, 0.95, present, {"a": 500}) == [
        f"no estimated Dice: {WITHHELD}", "spacing 3 mm"]
    assert review({"a": None}, Conformity(False, ["spacing 3 mm"]), cal, None, present, {"a": 0}) == [
        f"no estimated Dice: {WITHHELD}", "no a found, though every validation case had one", "spacing 3 mm"]
    assert review({"a": None}, Conformity(True), None, None) == []  # no calibration: no estimate-based reason


def test_a_flag_reason_never_reads_the_same_number_on_both_sides() -> None:
    from pipeline.quality import Conformity, review

    signals, dice = _synthetic(20)
    cal = fit_calibration(signals, dice, min_expected_dice=0.8712)
    present = {"a": 1.0}
    # Both round to 0.87: three decimals tell them apart.
    assert review({"a": 0.8704}, Conformity(True), cal, None, present, {"a": 500}) == [
        "estimated Dice of a 0.870 is below 0.871"]
    assert review({"a": 0.86}, Conformity(True), cal, None, present, {"a": 500}) == ["estimated Dice of a 0.86 is below 0.87"]
    assert review({"a": 0.87119}, Conformity(True), cal, None, present, {"a": 500}) == [
        "estimated Dice of a 0.87119 is below 0.87120"]


def test_a_non_conforming_input_gets_no_estimate_and_every_output_says_why(tmp_path) -> None:
    import csv
    import html

    from pipeline.quality import Conformity, case_record, write_report, write_summary_csv

    signals, dice = _synthetic(20)
    cal = fit_calibration(signals, dice, min_expected_dice=0.5)
    labels = np.zeros((20, 20, 10), np.uint8)
    labels[5:15, 5:15, 2:8] = 1
    # The signals of a confident prediction: in domain, the calibration estimates a high Dice.
    case_signals = {1: {"soft_dice": 0.99, "expected_error": 0.01, "voxels": 600.0, "spread": 0.0,
                        "boundary_entropy": 0.1}}
    args = (labels, np.eye(4), {1: "a"}, case_signals, cal)
    kwargs = {"model": {"name": "m", "version": "1"}, "settings": {}, "files": {"mask": "x.nii.gz"}}
    inside = case_record("inside", *args, Conformity(True), **kwargs)
    outside = case_record("outside", *args, Conformity(False, ["spacing 0.43x0.43x6.50 mm, trained on 1.00x1.00x1.00 mm"]),
                          **kwargs)
    assert inside["labels"]["a"]["estimated_dice"] > 0.9 and inside["estimate_withheld"] is None
    assert outside["labels"]["a"]["estimated_dice"] is None and outside["estimated_mean_dice"] is None
    assert outside["estimate_withheld"] == WITHHELD
    assert outside["flagged"] and outside["reasons"][0] == f"no estimated Dice: {WITHHELD}"
    assert outside["labels"]["a"]["signals"]["soft_dice"] == 0.99  # the signals are still recorded
    with open(write_summary_csv([inside, outside], tmp_path / "summary.csv"), newline="") as fp:
        rows = {r["case"]: r for r in csv.DictReader(fp)}
    assert rows["outside"]["a estimated_dice"] == "" and rows["outside"]["estimate_withheld"] == WITHHELD
    assert float(rows["inside"]["a estimated_dice"]) > 0.9 and rows["inside"]["estimate_withheld"] == ""
    assert rows["outside"]["reasons"].startswith(f"no estimated Dice: {WITHHELD}")
    page = write_report([inside, outside], tmp_path / "report.html", {}, "t").read_text()
    outside_row = next(r for r in page.split("<tr ") if 'data-case="outside"' in r)
    inside_row = next(r for r in page.split("<tr ") if 'data-case="inside"' in r)
    assert outside_row.count(f'title="{html.escape(WITHHELD)}">withheld</td>') == 2  # the label's and the mean's
    assert "withheld" not in inside_row


def test_the_calibration_plot_is_titled_with_the_out_of_sample_figures() -> None:
    from pipeline.evaluation.quality_review import _plot_title

    cal = Calibration({}, 0.7, {"cases": 42.0, "spearman": 0.61, "spearman_loo": 0.48, "spearman_oos": 0.48,
                                "worst5_caught": 2.0, "flagged_share": 0.19})
    title = _plot_title(cal)
    assert "rho 0.48" in title and "0.61" not in title  # the in-sample rho is not what the plot claims
    assert "caught 2/5" in title and "flagged 19%" in title and "NOT reliable" in title
    cal.validation = {"cases": 42.0, "spearman": 0.61, "spearman_loo": 0.48}  # a model saved before
    assert "rho 0.48" in _plot_title(cal) and "not assessed" in _plot_title(cal)
