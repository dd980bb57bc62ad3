"""Our sliding-window engine against MONAI's ``sliding_window_inference``: one run, side by side.

The same trained model and the same preprocessed volumes for every method:

* **hippocampus**: a real hippocampus MRI case (``../shared/data/hippocampus``), preprocessed with the
  model's plan;
* **ct**: the real chest CT series (``../shared/data/dicom/chest_ct``, 512 x 512 x 139) resampled to the
  model's spacing (``--ct synthetic`` instead: a 512 x 512 x 300 volume of noise).

Methods (each run in its own subprocess, so peak memory is its own):

* ``monai-default``: ``sliding_window_inference`` as its defaults stand (overlap 0.25, constant blending),
  ``sw_batch_size`` 4 as MONAI's tutorials write it, no test-time augmentation;
* ``monai-matched``: the model's own settings: same window, overlap, Gaussian blending, the same mirroring
  flips (one full call per flipped volume, averaged, as a MONAI user writes it) and ``sw_batch_size``;
* ``ours``: our engine with the model's stored settings (what ``predict`` runs);
* ``ours-monai-tiles``: our engine with MONAI's tile placement, for a bit-for-bit comparable output;
* ``monai-matched-bf16`` (with ``--monai-bf16``): MONAI's matched call under ``torch.autocast("cpu",
  dtype=torch.bfloat16)``, MONAI at its best on a CPU with native bf16, against ours at its best.

``--precision`` sets our engine's arithmetic (default: what the model stores; ``float32`` compares like for
like with MONAI's float32 calls).

Each method predicts ``--warmup`` untimed volumes, then ``--repeats`` timed ones, as one job (a batch, as
``predict`` over a folder runs). Volumes per second are the timed volumes' (steady state); the warm-up
time (for ours, when the job is long enough to pay for it, ``torch.compile``) is printed
apart, with the whole job's volumes per second next to it. Printed per volume and method: windows evaluated,
volumes per second, peak memory (RSS on the CPU, device memory on CUDA), the max absolute difference of the
class probabilities from MONAI's matched call, and the lines ``ratio vs MONAI matched: X.XX`` and
``ratio vs MONAI default: X.XX`` (and ``ratio vs MONAI matched-bf16``). Every method's line also says how close it
runs to the CPU's limit: the windows times the FLOP of one window's forward pass (``FlopCounterMode``), per
second, against the peak of the cores used for the method's precision (``pipeline/benchmarking.py``; the
derivation is printed). Results also go to ``--out`` (JSON).

    .venv/bin/python scripts/bench_inference.py --device cpu --threads 2
    .venv/bin/python scripts/bench_inference.py --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = ("monai-default", "monai-matched", "ours", "ours-monai-tiles")
MONAI_BF16 = "monai-matched-bf16"
DEFAULT_MODEL = "unet-work/hippo/checkpoints/fold_0/model.pt"
DEFAULT_CASE = "../shared/data/hippocampus/imagesTr/hippocampus_001.nii.gz"
DEFAULT_CT = "../shared/data/dicom/chest_ct"


def _prepare(args: argparse.Namespace, tmp: Path) -> dict[str, Path]:
    """Preprocess the volumes once with the model's plan; save them for the workers."""
    import torch

    from pipeline.inference import Predictor, load_model

    model = load_model(Path(args.model), torch.device("cpu"))
    predictor = Predictor([model], torch.device("cpu"))
    volumes = {}
    if "hippocampus" in args.volumes:
        volumes["hippocampus"] = predictor.load([args.case])["image"].as_tensor().float()
    if "ct" in args.volumes:
        if args.ct == "synthetic":
            volumes["ct"] = torch.randn(len(model.plan["modalities"]), 512, 512, 300, generator=torch.Generator().manual_seed(0))
        else:
            volumes["ct"] = predictor.load([args.ct])["image"].as_tensor().float()
    paths = {}
    for name, volume in volumes.items():
        paths[name] = tmp / f"{name}.pt"
        torch.save(volume.contiguous(), paths[name])
    return paths


def _worker(args: argparse.Namespace) -> None:
    """Run one method on one volume ``--repeats`` times; print a JSON line; save the probabilities."""
    import torch
    from monai.inferers import sliding_window_inference

    from pipeline.benchmarking import forward_flops
    from pipeline.inference import SlidingWindowInferer, load_model, window_size

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = load_model(Path(args.model), device)
    settings = model.settings
    if args.no_mirror:
        settings = dataclasses.replace(settings, mirror=False)
    if args.precision:
        settings = dataclasses.replace(settings, precision=args.precision)
    # MONAI's bf16 variant autocasts on the CPU as a MONAI user would write it; CUDA autocasts float16 anyway.
    monai_bf16 = args.method == MONAI_BF16 and device.type == "cpu"
    volume = torch.load(args.volume, weights_only=True)
    network = model.network
    roi = window_size(model.patch_size, network.spatial_dims)
    counted = {"windows": 0}

    def predictor(x: torch.Tensor) -> torch.Tensor:
        counted["windows"] += x.shape[0]
        with torch.autocast("cuda", enabled=device.type == "cuda"), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=monai_bf16):
            out = network(x[..., 0])[..., None] if network.spatial_dims == 2 else network(x)
        return out.float()

    def monai(x: torch.Tensor, matched: bool) -> torch.Tensor:
        axes = range(2) if network.spatial_dims == 2 else range(3)
        flips = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)] \
            if matched and settings.mirror else [()]
        total = None
        with torch.inference_mode():
            x = x[None].to(device)
            for dims in flips:
                axes_ = [d + 2 for d in dims]
                xi = torch.flip(x, axes_) if axes_ else x
                if matched:
                    out = sliding_window_inference(xi, roi, settings.sw_batch_size, predictor, overlap=settings.overlap,
                                                   mode=settings.mode)
                else:
                    out = sliding_window_inference(xi, roi, 4, predictor)
                out = torch.flip(out, axes_) if axes_ else out
                total = out if total is None else total + out
        return (total / len(flips))[0].cpu()

    engine = None
    if args.method.startswith("ours"):
        placement = "monai" if args.method == "ours-monai-tiles" else "nnunet"
        engine = SlidingWindowInferer(network, model.patch_size, settings.window(placement=placement), device)
        engine.volumes_left = args.repeats + args.warmup  # the whole job, so compile="auto" sees it coming

    def one() -> torch.Tensor:
        out = engine(volume) if engine is not None else monai(volume, args.method.startswith("monai-matched"))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    # Warm-up volumes (not timed): MONAI's first call and ours, which includes compiling when the job is long enough.
    start = time.perf_counter()
    for _ in range(args.warmup):
        one()
    warmup = time.perf_counter() - start
    counted["windows"] = 0
    start = time.perf_counter()
    logits = None
    for _ in range(args.repeats):
        logits = one()
    seconds = time.perf_counter() - start
    windows = engine.windows_evaluated if engine is not None else counted["windows"] // args.repeats
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss()
    probs = torch.softmax(logits.float(), 0).numpy()
    import numpy as np

    np.save(args.save, probs.astype(np.float32))
    if engine is not None:
        precision = engine.precision or "float32"
    else:
        precision = "bfloat16" if monai_bf16 else "float32"
    window = window_size(model.patch_size, network.spatial_dims)[:network.spatial_dims]
    flop = forward_flops(network, (1, volume.shape[0], *window))
    print(json.dumps({"precision": precision, "flop_per_window": flop,
                      "method": args.method, "seconds": seconds, "warmup_seconds": warmup, "warmup": args.warmup,
                      "volumes_per_second": args.repeats / seconds,
                      "job_volumes_per_second": (args.repeats + args.warmup) / (seconds + warmup),
                      "windows": windows, "peak_bytes": peak,
                      "path": engine.path if engine is not None else "", "shape": list(volume.shape)}))


def _peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM: unlike ``ru_maxrss``, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _run_method(args: argparse.Namespace, method: str, volume: Path, save: Path, repeats: int, warmup: int,
                no_mirror: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", method, "--volume", str(volume), "--save", str(save),
           "--model", args.model, "--device", args.device, "--threads", str(args.threads), "--repeats", str(repeats),
           "--warmup", str(warmup)]
    if no_mirror:
        cmd.append("--no-mirror")
    if args.precision:
        cmd += ["--precision", args.precision]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{method} on {volume.stem} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    """Parse arguments and run the benchmark (or one worker)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"a trained checkpoint (default {DEFAULT_MODEL})")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--case", default=DEFAULT_CASE, help="the hippocampus volume")
    p.add_argument("--ct", default=DEFAULT_CT, help="the CT series folder, or 'synthetic' for 512x512x300 noise")
    p.add_argument("--volumes", default="hippocampus,ct", help="comma-separated: hippocampus, ct")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed volumes per method (default: 20 hippocampus, 1 CT; on CUDA 50 and 3)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed volumes first (default: 1 hippocampus, 0 CT); their time is printed apart")
    p.add_argument("--ct-mirror", choices=["auto", "on", "off"], default="auto",
                   help="mirroring on the CT volume (auto: off on a CPU, where 8 flips of ~8500 windows take an hour "
                        "per method; on on CUDA)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    p.add_argument("--no-mirror", action="store_true", help="all methods without test-time mirroring")
    p.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default=None,
                   help="our engine's arithmetic on a CPU (default: what the model stores; float32: like MONAI's)")
    p.add_argument("--monai-bf16", action="store_true",
                   help=f"add {MONAI_BF16}: MONAI's matched call under bfloat16 autocast on the CPU")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default unet-work/bench_inference_DEVICE.json)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--volume", default=None, help=argparse.SUPPRESS)
    p.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.method = args.worker
        args.repeats = args.repeats or 1
        args.warmup = args.warmup or 0
        _worker(args)
        return
    import numpy as np

    args.volumes = [v.strip() for v in args.volumes.split(",") if v.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.monai_bf16 and MONAI_BF16 not in methods:
        methods.append(MONAI_BF16)
    results: dict[str, Any] = {"device": args.device, "threads": args.threads, "model": args.model,
                               "precision": args.precision or "stored", "volumes": {}}
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        tmp_path = Path(tmp)
        volumes = _prepare(args, tmp_path)
        for name, path in volumes.items():
            repeats = args.repeats or {("hippocampus", "cpu"): 20, ("ct", "cpu"): 1,
                                       ("hippocampus", "cuda"): 50, ("ct", "cuda"): 3}[(name, args.device)]
            warmup = args.warmup if args.warmup is not None else (1 if name == "hippocampus" else 0)
            no_mirror = args.no_mirror or (name == "ct" and (args.ct_mirror == "off" or (
                args.ct_mirror == "auto" and args.device == "cpu")))
            rows = {}
            for method in methods:
                rows[method] = _run_method(args, method, path, tmp_path / f"{name}-{method}.npy", repeats, warmup,
                                           no_mirror)
                print(f"  {name:<12} {method:<17} {rows[method]['volumes_per_second']:.4f} volumes/s", flush=True)
            reference = tmp_path / f"{name}-monai-matched.npy"
            for method, row in rows.items():
                mine = tmp_path / f"{name}-{method}.npy"
                row["max_abs_diff_vs_matched"] = (float(np.abs(np.load(mine) - np.load(reference)).max())
                                                  if reference.is_file() and mine.is_file() else None)
                _against_peak(row, args)
            results["volumes"][name] = {"repeats": repeats, "warmup": warmup, "mirror": not no_mirror, "methods": rows}
    _print(results)
    out = args.out or REPO / f"unet-work/bench_inference_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nresults: {out}")


def _against_peak(row: dict[str, Any], args: argparse.Namespace) -> None:
    """Add a method's achieved GFLOP/s over its timed volumes and, on a CPU, the peak for its precision and the ratio.

    Args:
        row: the worker's JSON line (windows per volume, FLOP per window, volumes per second, precision).
        args: the benchmark's arguments (device, threads).
    """
    from pipeline.benchmarking import achieved_line, cpu_peak

    flop = row["windows"] * row["flop_per_window"]
    row["gflops_per_s"] = flop * row["volumes_per_second"] / 1e9
    if args.device != "cpu":  # the peak rules know CPUs only
        row["peak"], row["against_peak"] = None, f"{row['gflops_per_s']:.1f} GFLOP/s ({args.device})"
        return
    peak = cpu_peak(row["precision"], args.threads)
    row["peak"], row["peak_gflops"], row["ratio_to_peak"] = peak.how, peak.gflops, peak.ratio(row["gflops_per_s"])
    row["against_peak"] = achieved_line(row["method"], flop, 1 / row["volumes_per_second"], peak)


def _print(results: dict[str, Any]) -> None:
    print(f"\ndevice {results['device']}, {results['threads']} thread(s), model {results['model']}")
    for name, volume in results["volumes"].items():
        rows = volume["methods"]
        shape = "x".join(map(str, next(iter(rows.values()))["shape"][1:]))
        print(f"\n{name} ({shape} voxels after preprocessing; mirroring {'on' if volume['mirror'] else 'off'}; "
              f"{volume['warmup']} warm-up + {volume['repeats']} timed volume(s) per method)")
        print(f"{'method':<18}{'windows':>9}{'volumes/s':>11}{'warm-up s':>11}{'job vol/s':>11}{'peak MiB':>10}"
              f"{'max |dp|':>11}")
        for method, r in rows.items():
            diff = r.get("max_abs_diff_vs_matched")
            print(f"{method:<18}{r['windows']:>9}{r['volumes_per_second']:>11.4f}{r['warmup_seconds']:>11.1f}"
                  f"{r['job_volumes_per_second']:>11.4f}{r['peak_bytes'] / 2**20:>10.0f}"
                  f"{'' if diff is None else f'{diff:.2e}':>11}")
        for r in rows.values():
            if "against_peak" in r:
                print(f"{name}: {r['against_peak']}")
        for peak in sorted({r["peak"] for r in rows.values() if r.get("peak")}):
            print(f"{name}: {peak}")
        if "ours" in rows:
            print(f"{name}: ours ran in {rows['ours'].get('precision', '?')}")
            for peer in ("monai-matched", "monai-default", MONAI_BF16):
                if peer in rows:
                    ratio = rows["ours"]["volumes_per_second"] / rows[peer]["volumes_per_second"]
                    job = rows["ours"]["job_volumes_per_second"] / rows[peer]["job_volumes_per_second"]
                    print(f"{name}: ratio vs MONAI {peer.removeprefix('monai-')}: {ratio:.2f}   "
                          f"(whole job, warm-up included: {job:.2f})")


if __name__ == "__main__":
    main()
