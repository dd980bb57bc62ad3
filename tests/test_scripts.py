"""The benchmark scripts: the MONAI baseline really trains and scores a fold; the benchmark builds its commands."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from pipeline.data.splits import kfold_splits
from tests.conftest import REPO, copy_hippocampus_subset


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_monai_baseline_trains_and_scores_the_pipeline_fold(hippocampus: Path, tmp_path: Path) -> None:
    """Eight real cases, 4 folds, ~20 s of patch training: a complete, well-formed result on the pipeline's fold.

    Patches smaller than the cases (as for head-and-neck CT and the left atrium), so the crops and the
    sliding-window validation over several windows are the code under test.
    """
    data = tmp_path / "data"
    copy_hippocampus_subset(data, 8)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "scripts/monai_baseline.py", "--data", str(data), "--num-folds", "4", "--fold", "1",
         "--time-budget-minutes", "0.3", "--threads", "2", "--out", str(out), "--patch", "32", "32", "16",
         "--batch-size", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ids = [p.name.removesuffix(".nii.gz") for p in (data / "labelsTr").iterdir()]
    val = kfold_splits(ids, num_folds=4, seed=0)[1]["val"]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["dice_per_label"]) == {"Anterior", "Posterior"}
    for value in [*summary["dice_per_label"].values(), summary["mean_dice"]]:
        assert math.isfinite(value) and 0.0 <= value <= 1.0
    assert summary["num_cases"] == len(val)
    assert summary["iterations"] >= 1 and summary["epochs"] >= 1 and summary["train_seconds"] > 0
    with (out / "cases.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["case"] for r in rows) == sorted(val)
    assert all(set(r) == {"case", "Anterior", "Posterior", "hd95 Anterior", "hd95 Posterior"} for r in rows)
    assert all(0.0 < float(r[f"hd95 {name}"]) < 100.0 for r in rows for name in ("Anterior", "Posterior"))
    assert summary["patch"] is True and summary["spatial_size"] == [32, 32, 16] and "patches of 32x32x16" in proc.stdout


def test_benchmark_builds_both_commands_with_the_same_budget_fold_and_threads(tmp_path: Path) -> None:
    bench = _load_script("benchmark_hippocampus")
    args = bench.build_parser().parse_args(
        ["--budget-minutes", "2.5", "--fold", "3", "--threads", "2", "--work-dir", str(tmp_path / "w")]
    )
    commands = bench.build_commands(args)
    assert list(commands) == ["ours", "baseline"]
    ours, baseline = commands["ours"], commands["baseline"]
    work = str((tmp_path / "w").resolve())

    assert ours[0].endswith("unet-pipeline") and ours[1:3] == ["run", "configs/hippocampus.yaml"]
    assert ours[ours.index("--work-dir") + 1] == f"{work}/ours"
    sets = [ours[i + 1] for i, part in enumerate(ours) if part == "--set"]
    assert {"train.time_budget_minutes=2.5", "data.fold=3", "train.num_threads=2"} <= set(sets)
    assert {"data.split_seed=0", "train.seed=0"} <= set(sets)

    assert baseline[:2] == [sys.executable, "scripts/monai_baseline.py"]
    opts = dict(zip(baseline[2::2], baseline[3::2]))
    assert opts["--time-budget-minutes"] == "2.5" and opts["--fold"] == "3" and opts["--threads"] == "2"
    assert opts["--out"] == f"{work}/baseline" and opts["--data"] == "../shared/data/hippocampus"
    assert (opts["--seed"], opts["--train-seed"]) == ("0", "0")


def test_benchmark_training_seeds_keep_the_fold_split(tmp_path: Path) -> None:
    """The protocol's three seeds: only the training seed moves, the split (and so the fold's cases) stays."""
    bench = _load_script("benchmark_hippocampus")
    commands = bench.build_commands(bench.build_parser().parse_args(["--train-seed", "2", "--work-dir", str(tmp_path)]))
    ours, baseline = commands["ours"], commands["baseline"]
    sets = {ours[i + 1] for i, part in enumerate(ours) if part == "--set"}
    assert {"train.seed=2", "data.split_seed=0"} <= sets
    opts = dict(zip(baseline[2::2], baseline[3::2]))
    assert (opts["--train-seed"], opts["--seed"]) == ("2", "0")
    baseline_parser = _load_script("monai_baseline").build_parser()
    assert baseline_parser.parse_args(["--train-seed", "2"]).train_seed == 2
    assert baseline_parser.parse_args([]).train_seed is None  # then --seed's, as before


def test_benchmark_defaults_and_only_one_side() -> None:
    bench = _load_script("benchmark_hippocampus")
    args = bench.build_parser().parse_args([])
    assert (args.budget_minutes, args.fold, args.only) == (20.0, 0, None)
    ours = bench.build_commands(args)["ours"]
    assert "train.time_budget_minutes=20" in ours and "data.fold=0" in ours
    assert list(bench.build_commands(bench.build_parser().parse_args(["--only", "baseline"]))) == ["baseline"]
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--only", "neither"])


def test_benchmark_comparison_difference_and_ratio() -> None:
    bench = _load_script("benchmark_hippocampus")
    ours = {"mean_dice": 0.8, "dice_per_label": {"Anterior": 0.9, "Posterior": 0.7}}
    base = {"mean_dice": 0.4, "dice_per_label": {"Anterior": 0.5, "Posterior": float("nan")}}
    rows = bench.compare(ours, base)
    assert rows["Anterior"]["difference"] == pytest.approx(0.4) and rows["Anterior"]["ratio"] == pytest.approx(1.8)
    assert rows["Posterior"]["difference"] is None and rows["Posterior"]["ratio"] is None
    assert rows["mean"]["ratio"] == pytest.approx(2.0)
    one_sided = bench.compare(ours, None)
    assert one_sided["mean"] == {"ours": 0.8, "baseline": None, "difference": None, "ratio": None}
    assert bench.compare(None, None) == {}


def test_benchmark_compares_the_common_cases_one_by_one(tmp_path: Path) -> None:
    bench = _load_script("benchmark_hippocampus")
    ours_csv, base_csv = tmp_path / "ours.csv", tmp_path / "base.csv"
    # Our evaluation's file has HD95 (mm) and surface Dice after the Dice columns: they stay out of the mean.
    ours_csv.write_text("case,Anterior,Posterior,hd95 Anterior,hd95 Posterior,surface_dice Anterior,"
                        "surface_dice Posterior\nc1,0.900000,0.800000,1.0,2.0,0.99,0.98\n"
                        "c2,0.800000,nan,1.0,nan,0.9,nan\nc3,0.700000,0.700000,3.5,4.0,0.8,0.8\n")
    base_csv.write_text("case,Anterior,Posterior\nc1,0.800000,0.800000\nc2,0.900000,nan\nc4,0.500000,0.500000\n")
    ours = bench.read_case_means(ours_csv)
    assert ours == pytest.approx({"c1": 0.85, "c2": 0.8, "c3": 0.7})  # NaN (label in neither mask) skipped
    result = bench.paired(ours, bench.read_case_means(base_csv))
    # Only c1 (+0.05) and c2 (-0.1) are scored by both sides.
    assert result["cases"] == 2 and result["mean_difference"] == pytest.approx(-0.025)
    assert (result["ours_wins"], result["baseline_wins"], result["ties"]) == (1, 1, 0)
    low, high = result["ci95"]
    assert -0.1 - 1e-9 <= low <= result["mean_difference"] <= high <= 0.05 + 1e-9 and low < high
    assert bench.paired(ours, {}) is None


@pytest.mark.slow
def test_inference_benchmark_compares_our_engine_with_monai_on_a_real_case(tmp_path: Path, checkpoint_2mm: Path,
                                                                          hippocampus: Path) -> None:
    """One real hippocampus case, the engine with MONAI's tiles against MONAI's matched call: same output,
    the same windows, the ratio line computed from the two measured speeds, MONAI under bf16 autocast as a
    flag, and each method's GFLOP/s against the CPU's peak for its precision."""
    case = sorted((hippocampus / "imagesTr").glob("*.nii.gz"))[0]
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_inference.py"), "--model", str(checkpoint_2mm), "--case",
         str(case), "--volumes", "hippocampus", "--methods", "monai-matched,ours,ours-monai-tiles", "--repeats", "2",
         "--warmup", "0", "--threads", "2", "--out", str(out), "--monai-bf16", "--precision", "float32"],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["volumes"]["hippocampus"]["methods"]
    assert rows["monai-matched"]["windows"] == rows["ours"]["windows"] == rows["ours-monai-tiles"]["windows"] > 0
    assert rows["ours-monai-tiles"]["max_abs_diff_vs_matched"] < 1e-4
    assert rows["monai-matched"]["max_abs_diff_vs_matched"] == 0.0
    ratio = rows["ours"]["volumes_per_second"] / rows["monai-matched"]["volumes_per_second"]
    assert f"hippocampus: ratio vs MONAI matched: {ratio:.2f}" in res.stdout
    assert all(r["peak_bytes"] > 0 for r in rows.values())

    from pipeline.benchmarking import cpu_peak

    bf16 = rows["monai-matched-bf16"]
    assert bf16["windows"] == rows["ours"]["windows"] and bf16["precision"] == "bfloat16"
    assert 0 < bf16["max_abs_diff_vs_matched"] < 0.1  # bf16 rounding of the same call, not another call
    ratio = rows["ours"]["volumes_per_second"] / bf16["volumes_per_second"]
    assert f"hippocampus: ratio vs MONAI matched-bf16: {ratio:.2f}" in res.stdout
    # The tiny 2 mm model: two 3x3x3 convolutions per level; one window of 32^3 is tens of MFLOP.
    assert len({r["flop_per_window"] for r in rows.values()}) == 1 and rows["ours"]["flop_per_window"] > 1e7
    for method, r in rows.items():
        assert r["precision"] == ("bfloat16" if method == "monai-matched-bf16" else "float32")
        assert r["gflops_per_s"] == pytest.approx(r["windows"] * r["flop_per_window"] * r["volumes_per_second"] / 1e9)
        peak = cpu_peak(r["precision"], 2)
        assert r["peak"] == peak.how and f"hippocampus: {peak.how}" in res.stdout
        if peak.gflops:
            assert r["ratio_to_peak"] == pytest.approx(r["gflops_per_s"] / peak.gflops)
            assert f"hippocampus: {method}: {r['gflops_per_s']:.1f} GFLOP/s" in res.stdout
            assert f"ratio to peak {r['ratio_to_peak']:.2f}" in res.stdout


def test_training_profile_splits_each_variant_step_into_its_phases(tiny_config: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Real steps of the training code on the tiny plan: the phases add up to the step, bf16 really autocasts,
    and each variant says its GFLOP/s against the CPU's peak for its precision."""
    from pipeline.inference import accelerate
    from pipeline.training.loop import TrainParts

    monkeypatch.setattr(accelerate, "cpu_has_native_bf16", lambda: True)
    profile = _load_script("profile_training")
    seen: list[bool] = []
    images: list = []
    real_forward = TrainParts.forward_loss

    def recording(self, image, label):
        seen.append(self.amp_dtype is not None)
        images.append(image.clone())
        return real_forward(self, image, label)

    monkeypatch.setattr(TrainParts, "forward_loss", recording)
    out = tmp_path / "profile.json"
    assert profile.main(["--config", str(tiny_config), "--work-dir", str(tmp_path / "w"), "--steps", "3",
                         "--warmup", "1", "--variants", "fp32,bf16+no-data", "--no-validation", "--out", str(out),
                         "--set", "train.batch_size=3"]) == 0
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["variants"]}
    assert set(rows) == {"fp32", "bf16+no-data"} and result["plan"]["batch_size"] == 3
    for r in rows.values():
        assert set(r["ms"]) == {"data", "forward", "backward", "optimizer"}
        assert all(v >= 0 for v in r["ms"].values())
        assert r["step_ms"] == pytest.approx(sum(r["ms"].values()))
        assert r["patches_per_s"] == pytest.approx(1000 * 3 / r["step_ms"])  # --set's batch of 3, not the tiny plan's 2
    assert seen == [False] * 4 + [True] * 4  # warm-up + timed steps of each variant
    # fp32 loads a new batch for every step; no-data trains every step on one batch loaded before the steps.
    import torch

    fp32, no_data = images[:4], images[4:]
    assert all(not torch.equal(a, b) for a, b in zip(fp32, fp32[1:]))
    assert all(torch.equal(no_data[0], b) for b in no_data[1:])

    from models.unet import UNet
    from pipeline.benchmarking import cpu_peak, forward_flops

    plan = result["plan"]
    forward = forward_flops(UNet(spatial_dims=3, in_channels=1, out_channels=3, features=plan["features"],
                                 norm="instance"), (3, 1, *plan["patch_size"]))
    assert 2.5 * forward < result["step_gflop"] * 1e9 < 3.3 * forward  # forward + backward of the batch of 3
    out_text = capsys.readouterr().out
    for r in rows.values():
        assert r["precision"] == ("float32" if r["variant"] == "fp32" else "bfloat16")
        assert r["gflops_per_s"] == pytest.approx(result["step_gflop"] / (r["step_ms"] / 1000))
        peak = cpu_peak(r["precision"], torch.get_num_threads())
        assert result["peaks"][r["precision"]] == peak.how and peak.how in out_text
        if peak.gflops:
            assert r["ratio_to_peak"] == pytest.approx(r["gflops_per_s"] / peak.gflops)
            assert f"step: {r['gflops_per_s']:.1f} GFLOP/s" in out_text and "ratio to peak" in out_text
    with pytest.raises(SystemExit):
        profile.main(["--variants", "fp32+no-such-lever"])


def test_predict_benchmark_stands_each_method_by_its_median_cold_run() -> None:
    bench = _load_script("bench_predict")
    runs = [{"wall_s": w, "peak_rss_mb": 900 + w} for w in (40.0, 31.0, 55.0)]
    median = bench._median_run(runs)
    assert median["wall_s"] == 40.0 and median["peak_rss_mb"] == 940.0
    assert median["walls_s"] == [40.0, 31.0, 55.0]
    assert bench._median_run(runs[:2])["wall_s"] == 40.0  # the upper median of two: never the lucky run
    assert bench._median_run(runs[1:2])["walls_s"] == [31.0]


def _fake_benchmark(work: Path, fold: int, train_seed: int, ours: dict[str, float] | None,
                    baseline: dict[str, float] | None, budget: float = 20.0) -> None:
    """A benchmark work dir as the script leaves it: ``benchmark.json`` and each side's ``cases.csv``."""
    bench = _load_script("benchmark_hippocampus")
    runs = {}
    for side, cases in (("ours", ours), ("baseline", baseline)):
        if cases is None:
            continue
        path = Path(bench.CASES[side].format(work=str(work.resolve()), fold=fold))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("case,Anterior,Posterior\n" + "".join(f"{c},{v},{v}\n" for c, v in cases.items()))
        runs[side] = {"summary": {"mean_dice": sum(cases.values()) / len(cases)}, "returncode": 0}
    (work / "benchmark.json").write_text(json.dumps(
        {"fold": fold, "train_seed": train_seed, "budget_minutes": budget, "seed": 0, "runs": runs}))


def test_benchmark_summary_averages_seeds_and_pairs_the_seed_means_per_fold(tmp_path: Path, capsys) -> None:
    """The protocol table: per fold, each side's seeds (mean, sd), the difference, and the case-paired
    comparison of the per-case seed means; the targets are met only when all three hold on every fold."""
    bench = _load_script("benchmark_hippocampus")
    dirs = [tmp_path / n for n in ("f0s0", "f0s1", "f0s2", "f1s0")]
    for d in dirs:
        d.mkdir()
    _fake_benchmark(dirs[0], 0, 0, {"a": 0.90, "b": 0.92}, {"a": 0.88, "b": 0.88})
    _fake_benchmark(dirs[1], 0, 1, {"a": 0.92, "b": 0.90}, None)  # ours only: the baseline ran once
    _fake_benchmark(dirs[2], 0, 2, {"a": 0.91, "b": 0.91}, {"a": 0.86, "b": 0.88})
    _fake_benchmark(dirs[3], 1, 0, {"a": 0.80, "b": 0.90}, {"a": 0.90, "b": 0.80})
    folds = bench.summarize(dirs)
    assert list(folds) == [0, 1]
    f0 = folds[0]
    assert f0["ours"]["seeds"] == [0, 1, 2] and f0["baseline"]["seeds"] == [0, 2]
    assert f0["ours"]["mean"] == pytest.approx(0.91) and f0["ours"]["sd"] == pytest.approx(0.0)
    assert f0["baseline"]["mean"] == pytest.approx(0.875) and f0["baseline"]["sd"] == pytest.approx(0.0070711, abs=1e-6)
    assert f0["difference"] == pytest.approx(0.035)
    # Per case over seeds: ours a 0.91, b 0.91; baseline a 0.87, b 0.88 -> +0.04 and +0.03.
    assert f0["paired"]["mean_difference"] == pytest.approx(0.035) and f0["paired"]["ours_wins"] == 2
    assert folds[1]["ours"]["sd"] is None and folds[1]["paired"]["mean_difference"] == pytest.approx(0.0)

    assert bench.print_summary({0: f0}, 0.895, 0.012) is True
    assert bench.print_summary({0: f0}, 0.92, 0.012) is False  # below the Dice target
    assert bench.print_summary(folds, 0.895, 0.012) is False  # fold 1 has no lead
    out = capsys.readouterr().out
    assert "0.9100 sd 0.0000 (3: 0,1,2)" in out and "NOT met" in out

    _fake_benchmark(tmp_path / "f0s3", 0, 3, {"a": 0.9, "b": 0.9}, None, budget=10.0)
    with pytest.raises(ValueError, match="another budget"):
        bench.summarize([*dirs, tmp_path / "f0s3"])
    assert bench.main(["--summarize", str(tmp_path / "missing")]) == 2
    assert "no benchmark.json" in capsys.readouterr().err


def test_fold_cases_writes_exactly_the_pipeline_folds_validation_cases(hippocampus: Path, tmp_path: Path) -> None:
    """Ten real cases, 5 folds: the written dataset holds fold 1's validation cases, byte for byte, and loads."""
    from pipeline.data import load_dataset, stored_splits

    copy_hippocampus_subset(tmp_path / "data", 10)
    ids = [c.case_id for c in load_dataset(tmp_path / "data").cases]
    # What a pipeline run stores in its work dir's splits.json for these cases.
    expected = stored_splits(ids, 5, 3, tmp_path / "work" / "splits.json")[1]["val"]
    script = _load_script("ensemble_vs_fold")
    written = script.fold_cases(tmp_path / "data", 1, 5, 3, tmp_path / "val")
    cases = load_dataset(written.parent).cases
    assert sorted(c.case_id for c in cases) == sorted(expected) and len(cases) == 2
    for case in cases:
        assert case.label.read_bytes() == (tmp_path / "data" / "labelsTr" / case.label.name).read_bytes()
        assert case.images[0].read_bytes() == (tmp_path / "data" / "imagesTr" / case.images[0].name).read_bytes()
    other = script.fold_cases(tmp_path / "data", 2, 5, 3, tmp_path / "val")  # rewritten, not added to
    assert {c.case_id for c in load_dataset(other.parent).cases}.isdisjoint(expected)
    with pytest.raises(SystemExit, match="--fold must be between 0 and 4"):
        script.fold_cases(tmp_path / "data", 5, 5, 3, tmp_path / "val5")


@pytest.mark.slow
def test_predict_benchmark_says_each_side_against_the_cpus_peak(tmp_path: Path, checkpoint_2mm: Path,
                                                                 hippocampus: Path) -> None:
    """One real hippocampus scan as job d, the tiny 2 mm model, MONAI under bf16 autocast: each side's windows
    and FLOP, its GFLOP/s in the engine and over the whole job, the peak's derivation, and the ratio line."""
    from pipeline.benchmarking import cpu_peak, forward_flops
    from pipeline.inference import load_model

    case = sorted((hippocampus / "imagesTr").glob("*.nii.gz"))[0]
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_predict.py"), "--model", str(checkpoint_2mm), "--work-dir",
         str(tmp_path / "w"), "--threads", "2", "--jobs", "d", "--cases", str(case), "--monai-bf16", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    job = json.loads(out.read_text())["d"]
    import torch

    model = load_model(checkpoint_2mm, torch.device("cpu"))
    window_flop = forward_flops(model.network, (1, 1, *model.patch_size))
    ours, monai = job["ours"], job["monai"]
    assert ours["windows"] == monai["windows"] > 0  # the same windows (no mirroring stored in this model)
    assert ours["flop"] == monai["flop"] == ours["windows"] * window_flop
    assert (ours["precision"], monai["precision"]) == ("float32", "bfloat16")
    for name, run in (("ours", ours), ("monai", monai)):
        assert run["job_gflops_per_s"] == pytest.approx(run["flop"] / run["wall_s"] / 1e9)
        assert run["engine_gflops_per_s"] == pytest.approx(run["flop"] / run["stages"]["engine"] / 1e9)
        peak = cpu_peak(run["precision"], 2)
        assert run["peak"] == peak.how and f"  {name} {peak.how}" in res.stdout
        if peak.gflops:
            ratio = run["job_gflops_per_s"] / peak.gflops
            assert f"  {name} whole job: {run['job_gflops_per_s']:.1f} GFLOP/s" in res.stdout
            assert f"ratio to peak {ratio:.2f}" in res.stdout
    assert f"job ratio vs MONAI: {monai['wall_s'] / ours['wall_s']:.2f}" in res.stdout


def test_paired_cases_compares_two_evaluations_case_by_case(tmp_path: Path) -> None:
    def table(path: Path, rows: dict[str, tuple[float, float]]) -> Path:
        with path.open("w", newline="") as fp:
            writer = csv.writer(fp)
            writer.writerow(["case", "Anterior", "Posterior", "hd95 Anterior", "hd95 Posterior"])
            for case, (a, p) in rows.items():
                writer.writerow([case, a, p, 99.0, 99.0])  # distances are not Dice: never averaged in
        return path

    a = table(tmp_path / "a.csv", {"c1": (0.9, 0.8), "c2": (0.7, 0.7), "c3": (0.5, 0.5), "only_a": (0.0, 0.0)})
    b = table(tmp_path / "b.csv", {"c1": (0.8, 0.8), "c2": (0.7, 0.7), "c3": (0.6, 0.6)})
    script = [sys.executable, str(REPO / "scripts" / "paired_cases.py")]
    done = subprocess.run([*script, str(a), str(b), "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    # per case: +0.05, 0, -0.1 on the three common cases
    assert result["cases"] == 3 and result["mean_difference"] == pytest.approx(-0.05 / 3)
    assert (result["ours_wins"], result["baseline_wins"], result["ties"]) == (1, 1, 1)
    assert result["ci95"][0] <= result["mean_difference"] <= result["ci95"][1]
    missing = subprocess.run([*script, str(a), str(tmp_path / "none.csv")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "none.csv: no such file" in missing.stderr


def test_cpu_runtime_benchmark_times_each_runtime_on_a_real_window(checkpoint_2mm: Path, hippocampus: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The tiny 2 mm model on a real scan's central window: the reference runtime agrees with itself exactly,
    bf16 autocast differs by rounding, each line carries its GFLOP/s; an unknown runtime is refused."""
    import torch

    from pipeline.benchmarking import forward_flops
    from pipeline.inference import load_model

    bench = _load_script("bench_cpu_runtimes")
    case = sorted((hippocampus / "imagesTr").glob("*.nii.gz"))[0]
    assert bench.main(["--model", f"tiny={checkpoint_2mm}:2", "--runtimes", "eager-fp32,eager-bf16",
                       "--threads", "2", "--case", str(case)]) == 0
    out = capsys.readouterr().out
    model = load_model(checkpoint_2mm, torch.device("cpu"))
    flop = forward_flops(model.network, (model.settings.sw_batch_size, 1, *model.patch_size))
    assert f"{flop / 1e9:.2f} GFLOP a batch" in out, out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert set(lines) == {"eager-fp32", "eager-bf16"}, out
    assert "x1.00 of eager-fp32" in lines["eager-fp32"]
    assert "max |dp| 0.0000, argmax agrees on 1.00000" in lines["eager-fp32"]
    dp = float(lines["eager-bf16"].split("max |dp| ")[1].split(",")[0])
    assert 0.0 < dp < 0.1, lines["eager-bf16"]  # bf16 rounds: not the same numbers, not another answer
    with pytest.raises(SystemExit) as refused:
        bench.main(["--model", f"tiny={checkpoint_2mm}", "--runtimes", "eager-fp32,tensorrt"])
    assert refused.value.code == 2 and "unknown runtime(s) tensorrt" in capsys.readouterr().err


class _WindowThreshold(torch.nn.Module):
    """Two logits that pick label 1 where the windowed CT exceeds ``level``: a stand-in network with a known answer."""

    def __init__(self, level: float) -> None:
        super().__init__()
        self.level = level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.level - x, x - self.level], dim=1)


def test_monai_baseline_ct_setting_windows_crops_resamples_and_inverts_on_real_ct(tmp_path: Path) -> None:
    """The CT tutorials' setting on a real head-and-neck CT (4.625 x 4.625 x 3 mm, stored as HU + 1024).

    The window is 849..1274 (-175..250 HU). The stand-in network thresholds the windowed volume, so its
    mask, predicted on the cropped (and resampled) volume and taken back through ``Invertd``, must agree
    with the same threshold applied to the CT as stored: exactly where no resampling happens, and up to
    interpolation where it does (thresholding a bilinear resampling is not nearest-neighbour labels).
    """
    import nibabel as nib
    import numpy as np

    from tests.conftest import SHARED_DATA

    image = SHARED_DATA / "hn_ct" / "imagesTr" / "openkbp_002.nii.gz"
    if not image.is_file():
        pytest.skip(f"real head-and-neck CT not found at {image} (see ../shared/data/README.md)")
    baseline = _load_script("monai_baseline")
    ct = nib.load(image)
    stored = np.asanyarray(ct.dataobj).astype(np.float32)
    body = 849.0 + 0.2 * 425.0  # -90 HU: the head against air
    label = tmp_path / "body.nii.gz"
    nib.save(nib.Nifti1Image((stored > body).astype(np.uint8), ct.affine), label)
    case = [{"case": "openkbp_002", "image": str(image), "label": str(label)}]

    def dice(spacing: tuple[float, float, float]) -> float:
        rows = baseline.evaluate(_WindowThreshold(0.2), case, {1: "body"}, (96, 96, 64), torch.device("cpu"),
                                 window=(849.0, 1274.0), spacing=spacing)
        return rows[0]["body"]

    assert dice((4.625, 4.625, 3.0)) == 1.0  # its own spacing: the crop and the padding invert exactly
    assert dice((3.906, 3.906, 2.5)) > 0.9  # resampled there and back, on the CT's own grid, not flipped

    # The foreground crop really happens, and the window really replaces the z-score.
    chain = baseline.build_transforms((96, 96, 64), train=False, window=(849.0, 1274.0), spacing=(3.906, 3.906, 2.5))
    out = chain({"image": str(image)})["image"]
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    resampled = [round(n * s / t) for n, s, t in zip(ct.shape, ct.header.get_zooms(), (3.906, 3.906, 2.5))]
    assert np.prod(out.shape[1:]) < 0.9 * np.prod(resampled)  # the air around the head is cropped
    zscored = baseline.build_transforms((96, 96, 64), train=False)({"image": str(image)})["image"]
    assert float(zscored.max()) > 1.5


def test_monai_baseline_holdout_stays_out_of_training_and_is_what_test_scores(hippocampus: Path, tmp_path: Path) -> None:
    """The script's split with a held-out list is the pipeline's: folds of the other cases, as ``data.holdout``."""
    baseline = _load_script("monai_baseline")
    cases = [{"case": f"c{i:02d}", "image": "", "label": ""} for i in range(20)]
    held = {"c03", "c07", "c11", "c19"}
    rest = sorted(c["case"] for c in cases if c["case"] not in held)
    train, scored = baseline.split_cases(cases, held, 4, 1, 0, test=False)
    assert sorted(c["case"] for c in scored) == kfold_splits(rest, 4, 0)[1]["val"]
    assert sorted(c["case"] for c in train) == kfold_splits(rest, 4, 0)[1]["train"]
    same_train, tested = baseline.split_cases(cases, held, 4, 1, 0, test=True)
    assert same_train == train and {c["case"] for c in tested} == held
    assert not held & {c["case"] for c in train}
    # A list naming a case the dataset lacks stops the script before any training.
    copy_hippocampus_subset(tmp_path / "ds", 3)
    listed = tmp_path / "held.txt"
    listed.write_text("hippocampus_001\nnot_a_case\n")
    with pytest.raises(SystemExit, match="not_a_case"):
        baseline.main(["--data", str(tmp_path / "ds"), "--holdout", str(listed)])
    with pytest.raises(SystemExit, match="--test scores the held-out cases"):
        baseline.main(["--data", str(tmp_path / "ds"), "--test"])
