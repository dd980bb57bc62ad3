"""One window batch of a model's network through each CPU runtime: where predict's network could run faster.

For each model given, one batch of ``sw_batch_size`` windows of its patch (its stored settings) runs through:

* ``eager-fp32``: the network as trained (the reference of every difference below);
* ``eager-bf16``: under CPU bfloat16 autocast, as the engine's eager path runs it;
* ``aot-bf16`` / ``aot-fp32``: the ahead-of-time package ``predict`` uses (built into the cache if absent);
* ``openvino-bf16`` / ``openvino-fp32``: OpenVINO's CPU plugin on the network converted with
  ``openvino.convert_model``, as ``predict`` serves it (:mod:`pipeline.inference.openvino_runtime`).

Per runtime: the median milliseconds per batch (min, max) over ``--repeats`` after two warm-up calls, the
speed against ``eager-fp32``, the achieved GFLOP/s and its ratio to the CPU's peak for that precision
(:mod:`pipeline.benchmarking`), and against ``eager-fp32`` the largest probability difference and the share
of voxels whose argmax agrees. The input is a real scan's window where ``--case`` is given, else noise::

    .venv/bin/python scripts/bench_cpu_runtimes.py --threads 2 \\
        --model hippocampus=HIPPO.pt:10 --model left_atrium=LA.pt:3 --model hn_ct=HN.pt:3

This times the network alone; a runtime only counts once it wins on a whole ``predict`` job
(``farm-bench --vs``, docs/results.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.benchmarking import cpu_peak, forward_flops  # noqa: E402
from pipeline.inference import aot  # noqa: E402
from pipeline.inference.model import load_model  # noqa: E402

RUNTIMES = ("eager-fp32", "eager-bf16", "aot-fp32", "aot-bf16", "openvino-fp32", "openvino-bf16")


def _time(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, repeats: int) -> tuple[float, float, float]:
    fn(x)
    fn(x)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), min(seconds), max(seconds)


def _openvino(network: torch.nn.Module, x: torch.Tensor, precision: str, threads: int) -> Callable:
    try:
        import openvino as ov
    except ImportError:
        raise SystemExit("error: openvino is not installed (pip install openvino), "
                         "or leave the openvino-* runtimes out") from None
    model = ov.convert_model(network, example_input=x)
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bfloat16"
                                                       else "f32", "INFERENCE_NUM_THREADS": threads,
                                                       "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    return lambda t: torch.from_numpy(request.infer([t.numpy()])[0].copy())


def runner(runtime: str, network: torch.nn.Module, x: torch.Tensor, threads: int) -> Callable:
    """The network as ``runtime`` runs it: one float32 batch in, float32 logits out.

    Args:
        runtime: one of :data:`RUNTIMES`.
        network: the float32 network, in evaluation mode.
        x: the batch it will take (its shape is compiled in).
        threads: the compute threads (OpenVINO keeps its own pool).
    """
    kind, precision = runtime.rsplit("-", 1)
    precision = "bfloat16" if precision == "bf16" else "float32"
    if kind == "eager":
        return aot.runnable(network, precision)
    if kind == "aot":
        key = aot.key_for(network, x.shape, "cpu", precision)
        run = aot.load(key) or aot.build(aot.runnable(network, precision), key)
        if run is None:
            raise SystemExit(f"error: no ahead-of-time package could be built for {runtime} on this machine")
        return run
    return _openvino(network, x, precision, threads)


def _input(model_path: Path, case: Path | None) -> tuple[torch.nn.Module, torch.Tensor]:
    model = load_model(model_path, torch.device("cpu"))
    channels = int(model.checkpoint["model"]["in_channels"])
    shape = (model.settings.sw_batch_size, channels, *model.patch_size)
    if case is None:
        return model.network, torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    from pipeline.inference import Predictor

    image = Predictor([model], torch.device("cpu")).load([case])["image"].as_tensor()
    starts = [max(0, (s - w) // 2) for s, w in zip(image.shape[1:], model.patch_size)]
    window = image[(slice(None), *(slice(a, a + w) for a, w in zip(starts, model.patch_size)))]
    pad = [p for s, w in reversed(list(zip(window.shape[1:], model.patch_size))) for p in (0, max(0, w - s))]
    window = torch.nn.functional.pad(window, pad)
    return model.network, window.unsqueeze(0).expand(shape[0], *window.shape).contiguous().float()


def main(argv: list[str] | None = None) -> int:
    """Time each runtime on each model's window batch and print one line per runtime."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=MODEL.pt[:REPEATS]",
                        help="a task's model; repeatable")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help=f"comma-separated, of {', '.join(RUNTIMES)}")
    parser.add_argument("--threads", type=int, default=0, help="compute threads (0: torch's default)")
    parser.add_argument("--case", type=Path, help="a scan whose central window is the input (default: noise)")
    args = parser.parse_args(argv)
    runtimes = [r for r in args.runtimes.split(",") if r]
    unknown = sorted(set(runtimes) - set(RUNTIMES))
    if unknown:
        parser.error(f"unknown runtime(s) {', '.join(unknown)}; choose from {', '.join(RUNTIMES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    for spec in args.model:
        name, _, rest = spec.partition("=")
        path, _, repeats = rest.rpartition(":") if ":" in rest else (rest, "", "5")
        network, x = _input(Path(path), args.case)
        flop = forward_flops(network, x.shape)
        print(f"{name}: batch {tuple(x.shape)}, {flop / 1e9:.2f} GFLOP a batch, {threads} threads")
        with torch.inference_mode():
            reference = torch.softmax(network(x), 1)
            base = None
            for runtime in runtimes:
                run = runner(runtime, network, x, threads)
                median, low, high = _time(run, x, int(repeats))
                base = base or (median if runtime == "eager-fp32" else None)
                p = torch.softmax(run(x).float(), 1)
                peak = cpu_peak("bfloat16" if runtime.endswith("bf16") else "float32", threads)
                ratio = peak.ratio(flop / median / 1e9)
                print(f"  {runtime:14s} {median * 1e3:8.1f} ms (min {low * 1e3:.1f}, max {high * 1e3:.1f})"
                      + (f"  x{base / median:4.2f} of eager-fp32" if base else "")
                      + f"  {flop / median / 1e9:6.1f} GFLOP/s" + (f", {ratio:.2f} of the {peak.precision} peak" if ratio else "")
                      + f"  max |dp| {(p - reference).abs().max().item():.4f}"
                      + f", argmax agrees on {(p.argmax(1) == reference.argmax(1)).float().mean().item():.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
