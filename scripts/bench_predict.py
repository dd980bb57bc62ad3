"""Whole ``predict`` jobs, as a user runs them: ours against the same job with MONAI's sliding window substituted.

Three jobs, each run twice in cold processes (interpreter start, imports, model
resolution, reading, preprocessing, the sliding window, inversion to the input's grid,
postprocessing, NIfTI and DICOM SEG writing all counted):

* **(a)** one hippocampus scan, the model's stored settings (mirroring on);
* **(b)** 20 hippocampus scans, the model's stored settings (mirroring on);
* **(c)** the real chest CT series (``../shared/data/dicom/chest_ct``) without mirroring.

``ours`` is ``unet-pipeline predict`` as shipped. ``monai`` is the same command in which
our engine's call is replaced by MONAI's ``sliding_window_inference`` with the same
windows (the model's patch), overlap, Gaussian blending, windows per batch and mirroring
flips (one full call per flipped volume, averaged, as a MONAI user writes it, float32 on a
CPU; the per-voxel spread that ``predict``'s quality estimate needs from the same flipped
outputs): what ``predict`` cost before our engine. ``--precision`` sets our network's
arithmetic (``predict --precision``; default: what the model stores, ``auto`` for models
trained since ``evaluate.precision`` exists, float32 for older ones). A model version is
compiled ahead of time once (at registration or by its first long job); the script does
that first, untimed, and prints what it cost.

``--monai-bf16`` runs MONAI's calls under ``torch.autocast("cpu", dtype=torch.bfloat16)`` instead: each side at its
best on a CPU with native bf16. ``--jobs d --cases PATH...`` runs one more job on the given files or series
folders (another task's scans with its model; ``--no-mirror`` for it without mirroring).

Printed per job: wall seconds of each, peak RSS, the time per stage inside the process
(read+preprocess, engine, inversion, postprocessing, writing, SEG, model resolution),
``job ratio vs MONAI: X.XX`` (MONAI's wall time over ours), and how close each side runs to the CPU's
limit: the windows it evaluated times the FLOP of one window's forward pass (``FlopCounterMode``), per second
of the engine and per second of the whole job, against the peak of the cores used for its precision
(``pipeline/benchmarking.py``; the derivation is printed). With ``--repeat N`` each job
runs N times per method, interleaved (ours, MONAI, ours, ...), and the run with the median wall
time stands for each method: MONAI's eager path varies by about 15% between cold runs on
2 cores, ours by 5%. Results also go to ``--out``.

    .venv/bin/python scripts/bench_predict.py --model models:/hippocampus-3d@champion --work-dir unet-work/hippo
    .venv/bin/python scripts/bench_predict.py --model PATH/model.pt --jobs ab --repeat 3
    .venv/bin/python scripts/bench_predict.py --model PATH/model.pt --device cuda
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HIPPOCAMPUS = REPO.parent / "shared" / "data" / "hippocampus" / "imagesTr"
CT = REPO.parent / "shared" / "data" / "dicom" / "chest_ct"
JOBS = {"a": "one hippocampus scan", "b": "20 hippocampus scans, mirroring", "c": "chest CT, no mirroring",
        "d": "the --cases given"}
MONAI_BF16_ENV = "BENCH_PREDICT_MONAI_BF16"
METHODS = ("ours", "monai")


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(owner: Any, name: str, stage: str, times: dict[str, float]) -> None:
    """Wrap ``owner.name`` so that its wall time adds to ``times[stage]``."""
    real = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            times[stage] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def _monai_engine() -> None:
    """Replace our engine's call by MONAI's ``sliding_window_inference`` with the engine's own settings."""
    import torch
    from monai.inferers import sliding_window_inference

    from pipeline.inference import sliding_window
    from pipeline.inference.stitching import class_argmax

    bf16 = os.environ.get(MONAI_BF16_ENV) == "1"

    def passes(self: sliding_window.SlidingWindowInferer, image: torch.Tensor, spread: bool, agreement: Any = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        s, network, cuda = self.settings, self.network, self.device.type == "cuda"
        self.windows_evaluated = 0
        self.precision = "bfloat16" if bf16 and not cuda else "float32"

        def predictor(x: torch.Tensor) -> torch.Tensor:
            self.windows_evaluated += x.shape[0]
            with torch.autocast("cuda", enabled=cuda), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = network(x[..., 0])[..., None] if self.spatial_dims == 2 else network(x)
            return out.float()

        axes = range(2) if self.spatial_dims == 2 else range(3)
        flips = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)] if s.mirror else [()]
        total = squares = None
        with torch.inference_mode():
            x = image.float()[None].to(self.device)
            for dims in flips:
                axes_ = [d + 2 for d in dims]
                xi = torch.flip(x, axes_) if axes_ else x
                out = sliding_window_inference(xi, self.window, s.batch_size, predictor, overlap=s.overlap, mode=s.mode,
                                               sigma_scale=s.sigma_scale)
                out = torch.flip(out, axes_) if axes_ else out
                if agreement is not None:  # each pass's own mask, as the engine collects them
                    agreement.add(class_argmax(out[0]))
                total = out if total is None else total + out
                if spread:  # the disagreement of the mirrored passes, as a MONAI user would add it
                    sq = out.square().sum(1)
                    squares = sq if squares is None else squares + sq
        mean = (total / len(flips))[0].float().cpu().contiguous()
        if squares is None:
            return mean, None
        sd = (squares[0].cpu() / len(flips) - mean.square().sum(0)).clamp_(min=0).sqrt_()
        return mean, sd

    def call(self: sliding_window.SlidingWindowInferer, image: torch.Tensor) -> torch.Tensor:
        return passes(self, image, False)[0]

    def with_spread(self: sliding_window.SlidingWindowInferer, image: torch.Tensor, agreement: Any = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        if agreement is not None:
            agreement.reset()
        logits, sd = passes(self, image, True, agreement)
        assert sd is not None
        return logits, sd

    sliding_window.SlidingWindowInferer.__call__ = call
    sliding_window.SlidingWindowInferer.with_spread = with_spread


def _count_windows(work: dict[str, Any]) -> None:
    """After each engine call, add the windows it evaluated and their FLOP (one window's forward pass, counted once
    per engine) to ``work``, with the engine's precision."""
    from pipeline.benchmarking import forward_flops
    from pipeline.inference import sliding_window

    cls = sliding_window.SlidingWindowInferer
    flop_of: dict[int, int] = {}

    def counting(name: str) -> None:
        real = getattr(cls, name)

        def wrapper(self: Any, image: Any, *args: Any, **kwargs: Any) -> Any:
            out = real(self, image, *args, **kwargs)
            if id(self) not in flop_of:
                flop_of[id(self)] = forward_flops(self.network, (1, image.shape[0], *self.window[:self.spatial_dims]))
            work["windows"] += self.windows_evaluated
            work["flop"] += self.windows_evaluated * flop_of[id(self)]
            work["precision"] = self.precision
            return out

        setattr(cls, name, wrapper)

    counting("__call__")
    counting("with_spread")


def _worker(method: str, predict_args: list[str]) -> None:
    """One ``predict`` call in this (cold) process; prints a JSON line with its stage times, peak RSS and work."""
    # Only pipeline modules, as ``unet-pipeline`` starts: importing MONAI first would change how it is imported.
    import pipeline.inference.predict as batch
    from pipeline.cli import main
    from pipeline.inference import predictor, sliding_window
    from pipeline.inference.postprocessing import Postprocessing
    from pipeline.registry import predictors as registry

    if method == "monai":
        _monai_engine()
    times: dict[str, float] = defaultdict(float)
    _timed(registry, "resolve_model", "model resolution", times)
    _timed(predictor.Predictor, "load", "read+preprocess", times)
    _timed(sliding_window.SlidingWindowInferer, "__call__", "engine", times)
    _timed(sliding_window.SlidingWindowInferer, "with_spread", "engine", times)
    _timed(predictor.Invertd, "__call__", "inversion", times)
    _timed(Postprocessing, "apply", "postprocessing", times)
    _timed(batch, "write_label_map", "writing", times)
    _timed(batch, "write_probabilities", "writing", times)
    _timed(batch, "write_dicom_seg", "SEG", times)
    work: dict[str, Any] = {"windows": 0, "flop": 0, "precision": ""}
    # Wrapped around the engine's timing: counting a window's FLOP (on a meta copy, about a second) is no engine time.
    _count_windows(work)
    start = time.perf_counter()
    code = main(["predict", *predict_args])
    times["predict call"] = time.perf_counter() - start
    print(json.dumps({"code": code, "stages": times, "peak_rss_mb": _peak_rss_mb(), **work}))


def _job_args(job: str, args: argparse.Namespace, out: Path) -> list[str]:
    cases = sorted(HIPPOCAMPUS.glob("*.nii.gz"))
    inputs = {"a": [cases[-1]], "b": cases[-20:], "c": [CT], "d": args.cases}[job]
    extra = ["--no-mirror"] if job == "c" or (job == "d" and args.no_mirror) else []
    if args.precision:
        extra += ["--precision", args.precision]
    return ["--model", args.model, "--device", args.device, "--work-dir", args.work_dir, "--out", str(out), *extra,
            *map(str, inputs)]


def _run(method: str, job: str, args: argparse.Namespace, tmp: Path, repeat: int = 0) -> dict[str, Any]:
    out = tmp / f"{job}-{method}-{repeat}"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--", *_job_args(job, args, out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else dict(os.environ)
    env[MONAI_BF16_ENV] = "1" if args.monai_bf16 else "0"
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{method} job ({job}) failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["code"] != 0:
        raise SystemExit(f"{method} job ({job}) exited {result['code']}:\n{done.stderr[-3000:]}")
    return {"wall_s": wall, **result}


def _compile_once(args: argparse.Namespace) -> float:
    """Build the model's ahead-of-time package (what registration or a first long job does); seconds it took."""
    from pipeline import registry
    from pipeline.inference import compile_ahead_of_time

    if args.device != "cpu":
        return 0.0
    with tempfile.TemporaryDirectory() as tmp:
        resolved = registry.resolve_model(args.model, Path(args.work_dir), Path(tmp))
        start = time.perf_counter()
        compile_ahead_of_time(resolved.path, args.precision)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models:/hippocampus-3d@champion")
    parser.add_argument("--work-dir", default="unet-work/hippo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the jobs (0: as set)")
    parser.add_argument("--jobs", default="abc", help="which of a, b, c (and d, with --cases) to run")
    parser.add_argument("--cases", nargs="+", default=[], help="job d's inputs: files or DICOM series folders")
    parser.add_argument("--no-mirror", action="store_true", help="job d without mirroring")
    parser.add_argument("--monai-bf16", action="store_true",
                        help="MONAI's calls under bfloat16 autocast on the CPU (default: float32, as a MONAI script)")
    parser.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default=None,
                        help="predict --precision for ours (default: the model's stored setting); "
                             "the MONAI path is float32 eager, as a MONAI script runs on a CPU")
    parser.add_argument("--repeat", type=int, default=1,
                        help="cold runs of each job per method, interleaved; the median wall time is reported")
    parser.add_argument("--out", default="bench_predict.json")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        _worker(args.worker, [a for a in rest if a != "--"])
        return
    if not HIPPOCAMPUS.is_dir() or not CT.is_dir():
        raise SystemExit(f"shared data not found under {REPO.parent / 'shared' / 'data'}")
    print(f"ahead-of-time compile (once per model version, untimed in the jobs): {_compile_once(args):.1f} s")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        for job in args.jobs:
            # Interleaved, so that a slow spell of the machine falls on both methods alike.
            runs = [{m: _run(m, job, args, Path(tmp), r) for m in METHODS} for r in range(args.repeat)]
            results[job] = {m: _median_run([run[m] for run in runs]) for m in METHODS}
            results[job]["repeats"] = runs
            _print(job, results[job], len(runs), args.threads)
    Path(args.out).write_text(json.dumps(results, indent=1))


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median wall time (the upper median of an even count), with every run's wall time."""
    ordered = sorted(runs, key=lambda r: r["wall_s"])
    return {**ordered[len(ordered) // 2], "walls_s": [r["wall_s"] for r in runs]}


def _against_peak(run: dict[str, Any], threads: int) -> list[str]:
    """A side's achieved GFLOP/s in the engine and over the whole job against the CPU's peak for its precision,
    added to ``run``; the lines to print, the peak's derivation last.

    Args:
        run: one side's median run (its windows' FLOP, the engine's seconds, the wall seconds, its precision).
        threads: the jobs' threads (0: as set, so every usable CPU counts).
    """
    from pipeline.benchmarking import achieved_line, cpu_peak

    if not run.get("flop") or run.get("precision") not in ("float32", "bfloat16"):
        return []  # no window evaluated, or not on a CPU: the peak rules know CPUs only
    peak = cpu_peak(run["precision"], threads or None)
    engine_s = run["stages"].get("engine", 0.0)
    run["engine_gflops_per_s"] = run["flop"] / engine_s / 1e9 if engine_s else None
    run["job_gflops_per_s"] = run["flop"] / run["wall_s"] / 1e9
    run["peak"], run["peak_gflops"] = peak.how, peak.gflops
    lines = [achieved_line("engine", run["flop"], engine_s, peak)] if engine_s else []
    return [*lines, achieved_line("whole job", run["flop"], run["wall_s"], peak), peak.how]


def _print(job: str, result: dict[str, Any], repeats: int = 1, threads: int = 0) -> None:
    ours, monai = result["ours"], result["monai"]
    print(f"\n({job}) {JOBS[job]}" + (f", median of {repeats} cold runs each" if repeats > 1 else ""))
    print(f"  {'':22s} {'ours':>9s} {'monai':>9s}")
    print(f"  {'wall s':22s} {ours['wall_s']:9.1f} {monai['wall_s']:9.1f}")
    print(f"  {'peak RSS MB':22s} {ours['peak_rss_mb']:9.0f} {monai['peak_rss_mb']:9.0f}")
    for stage in sorted(set(ours["stages"]) | set(monai["stages"])):
        print(f"  {stage:22s} {ours['stages'].get(stage, 0.0):9.1f} {monai['stages'].get(stage, 0.0):9.1f}")
    start_o = ours["wall_s"] - ours["stages"]["predict call"]
    start_m = monai["wall_s"] - monai["stages"]["predict call"]
    print(f"  {'start and imports':22s} {start_o:9.1f} {start_m:9.1f}")
    if repeats > 1:
        walls = {m: " ".join(f"{w:.1f}" for w in result[m]["walls_s"]) for m in METHODS}
        print(f"  {'every run, wall s':22s} ours {walls['ours']} | monai {walls['monai']}")
    for name, run in (("ours", ours), ("monai", monai)):
        lines = _against_peak(run, threads)
        if lines:
            print(f"  {name}: {run['windows']} windows of {run['flop'] / run['windows'] / 1e9:.2f} GFLOP, "
                  f"{run['precision']}")
        for line in lines:
            print(f"  {name} {line}")
    print(f"  job ratio vs MONAI: {monai['wall_s'] / ours['wall_s']:.2f}")


if __name__ == "__main__":
    main()
