"""Where a training step's time goes, and what each CPU speed lever buys: one run, side by side.

Builds the network, loss, optimiser and patch stream exactly as ``unet-pipeline run`` does
for a config's plan and fold (``pipeline.training.loop.build_parts`` and the same
``PatchStream``), then times training steps phase by phase:

* ``data``: the next batch from the loader (crop, augmentation, collation);
* ``forward``: the network and the deep-supervision loss;
* ``backward``: back-propagation;
* ``optimizer``: gradient clipping, the AdamW/SGD step (and the weight average when on).

Each variant changes one thing against ``current`` (the config as it is); ``a+b`` combines two:

* ``fp32``: no autocast (``train.amp: false``; what ``current`` is on a CPU without native bf16);
* ``bf16``: bfloat16 autocast of the forward pass (``train.amp``'s choice on AVX-512 BF16 / AMX CPUs);
* ``no-augment``: crops only: the upper bound of what faster augmentation could give;
* ``no-data``: one batch reused: the network's own speed;
* ``workers1``: augmentation in one loader process, overlapped with the step;
* ``channels-last``: channels-last memory order for weights and patches;
* ``compile``: ``torch.compile`` of the network (its compile time printed apart).

Each variant's line also says how close it runs to the CPU's limit: the FLOP of one step (forward and
backward of the plan's batch, counted once with ``FlopCounterMode``) times the steps per second, against the
peak of the cores used for the variant's precision (``pipeline/benchmarking.py``; the derivation is printed).

It also times one validation pass (sliding window over the fold's validation cases,
as training does every ``train.val_every`` epochs) and prints its share of a budget.

    .venv/bin/python scripts/profile_training.py --work-dir unet-work/profile
    .venv/bin/python scripts/profile_training.py --variants current,bf16 --steps 100
    .venv/bin/python scripts/profile_training.py --variants current --set train.batch_size=4  # another plan
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.benchmarking import achieved_line, cpu_peak, training_step_flops  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data import mirror_swaps  # noqa: E402
from pipeline.stages import prepare  # noqa: E402
from pipeline.training.augmentation import train_transforms  # noqa: E402
from pipeline.training.loop import build_parts, load_cases, model_kwargs  # noqa: E402
from pipeline.training.patches import PatchStream, patch_loader  # noqa: E402
from pipeline.training.validation import validate  # noqa: E402

VARIANTS = ("current", "fp32", "bf16", "no-augment", "no-data", "workers1", "channels-last", "compile")
PHASES = ("data", "forward", "backward", "optimizer")


def _variant_config(cfg: Any, variant: str) -> Any:
    cfg = copy.deepcopy(cfg)
    if "no-augment" in variant.split("+"):
        cfg.train = dataclasses.replace(cfg.train, augment=False)
    if "workers1" in variant.split("+"):
        cfg.train = dataclasses.replace(cfg.train, num_workers=1)
    return cfg


def profile_variant(cfg: Any, plan: dict[str, Any], train_data: list[dict], variant: str, steps: int,
                    warmup: int) -> dict[str, Any]:
    """Time ``steps`` training steps of one variant after ``warmup`` untimed ones.

    Args:
        cfg: the pipeline configuration.
        plan: the plan (patch, batch, features).
        train_data: the fold's training cases, loaded.
        variant: one of :data:`VARIANTS`.
        steps: timed steps.
        warmup: untimed steps first (allocator, oneDNN kernels, compilation).
    """
    cfg, levers = _variant_config(cfg, variant), set(variant.split("+"))
    t, device = cfg.train, torch.device("cpu")
    torch.manual_seed(t.seed)
    patch, batch = list(plan["network"]["patch_size"]), int(plan["network"]["batch_size"])
    parts = build_parts(t, model_kwargs(cfg, plan), device)
    if "channels-last" in levers:
        parts.network.to(memory_format=torch.channels_last_3d)
    if "fp32" in levers:
        parts.amp_dtype = None
    if "bf16" in levers:
        parts.amp_dtype = torch.bfloat16
    if "compile" in levers:
        parts.network = torch.compile(parts.network)
    stream = PatchStream(train_data, train_transforms(cfg, patch, mirror_swaps(plan)), t.seed, 0, 100 * batch)
    workers = t.num_workers or 0
    batches = iter(patch_loader(stream, 0, 1000, batch, workers, False))
    fixed = next(batches) if "no-data" in levers else None
    parts.network.train()
    times: dict[str, list[float]] = defaultdict(list)
    first_step = 0.0
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        image, label = fixed if fixed is not None else next(batches)
        if "channels-last" in levers:
            image = image.contiguous(memory_format=torch.channels_last_3d)
        t1 = time.perf_counter()
        loss = parts.forward_loss(image, label)
        float(loss.detach())
        t2 = time.perf_counter()
        parts.backward(loss)
        t3 = time.perf_counter()
        parts.step()
        t4 = time.perf_counter()
        if i == 0:
            first_step = t4 - t0
        if i >= warmup:
            for name, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[name].append(dt)
    del batches
    ms = {name: 1000 * float(np.mean(v)) for name, v in times.items()}
    total = sum(ms.values())
    return {"variant": variant, "ms": ms, "step_ms": total, "patches_per_s": 1000 * batch / total,
            "first_step_s": first_step, "precision": parts.precision}


def _print_table(rows: list[dict[str, Any]]) -> None:
    base = rows[0]["patches_per_s"]
    print(f"\n{'variant':<20}" + "".join(f"{p:>11}" for p in PHASES) + f"{'step':>9}{'patches/s':>11}{'vs first':>10}"
          f"{'GFLOP/s':>9}{'of peak':>9}")
    for r in rows:
        cells = "".join(f"{r['ms'][p]:>9.0f}ms" for p in PHASES)
        ratio = r.get("ratio_to_peak")
        print(f"{r['variant']:<20}{cells}{r['step_ms']:>7.0f}ms{r['patches_per_s']:>11.2f}"
              f"{r['patches_per_s'] / base:>9.2f}x{r.get('gflops_per_s', 0.0):>9.1f}"
              f"{'-' if ratio is None else f'{ratio:.2f}':>9}")
    for r in rows:
        if "compile" in r["variant"].split("+"):
            print(f"compile: first step (compilation) {r['first_step_s']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "hippocampus.yaml"))
    parser.add_argument("--work-dir", default=str(REPO / "unet-work" / "profile"),
                        help="work dir with (or for) the preprocessed cases")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=60, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--budget-minutes", type=float, default=20.0, help="for the validation share")
    parser.add_argument("--no-validation", action="store_true")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as for unet-pipeline (e.g. train.batch_size=4); repeatable")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted({lever for v in variants for lever in v.split("+")} - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [f"data.fold={args.fold}", *args.overrides])
    prepared = prepare(cfg, Path(args.work_dir))
    plan = prepared.plan
    net = plan["network"]
    print(f"plan: patch {net['patch_size']}, batch {net['batch_size']}, features {net['features']}; "
          f"{len(prepared.split['train'])} training cases; torch {torch.__version__}, {torch.get_num_threads()} threads")
    train_data = load_cases(prepared.subset("train"))
    counted = build_parts(cfg.train, model_kwargs(cfg, plan), torch.device("cpu"))
    step_flop = training_step_flops(counted.network, counted.loss_fn,
                                    (int(net["batch_size"]), len(plan["modalities"]), *net["patch_size"]))
    print(f"one step: {step_flop / 1e9:.1f} GFLOP (forward and backward of the batch, FlopCounterMode)")
    rows, peaks = [], {}
    for variant in variants:
        rows.append(profile_variant(cfg, plan, train_data, variant, args.steps, args.warmup))
        r = rows[-1]
        if r["precision"] not in peaks:
            peaks[r["precision"]] = cpu_peak(r["precision"], torch.get_num_threads())
            print(peaks[r["precision"]].how)
        peak = peaks[r["precision"]]
        r["gflops_per_s"] = step_flop / (r["step_ms"] / 1000) / 1e9
        r["peak_gflops"], r["ratio_to_peak"] = peak.gflops, peak.ratio(r["gflops_per_s"])
        print(f"{variant}: {r['patches_per_s']:.2f} patches/s ({r['step_ms']:.0f} ms per step); "
              + achieved_line("step", step_flop, r["step_ms"] / 1000, peak), flush=True)
    _print_table(rows)
    result: dict[str, Any] = {"variants": rows, "plan": net, "torch": torch.__version__,
                              "threads": torch.get_num_threads(), "step_gflop": step_flop / 1e9,
                              "peaks": {p: peak.how for p, peak in peaks.items()}}
    if not args.no_validation:
        val_data = load_cases(prepared.subset("val"))
        parts = build_parts(cfg.train, model_kwargs(cfg, plan), torch.device("cpu"))
        labels = sorted(int(k) for k in plan["labels"] if int(k) != 0)
        t0 = time.perf_counter()
        validate(parts.network, val_data, cfg, net["patch_size"], labels, torch.device("cpu"))
        val_s = time.perf_counter() - t0
        step_s = rows[0]["step_ms"] / 1000
        epoch_s = step_s * (cfg.train.iterations_per_epoch or 1)
        per_budget = args.budget_minutes * 60 / (epoch_s * cfg.train.val_every + val_s)
        share = per_budget * val_s / (args.budget_minutes * 60)
        print(f"validation: {val_s:.1f} s for {len(val_data)} cases; every {cfg.train.val_every} epochs "
              f"({epoch_s:.0f} s each) that is ~{per_budget:.0f} validations, {100 * share:.0f}% of a "
              f"{args.budget_minutes:g}-minute budget")
        result["validation_s"], result["validation_share"] = val_s, share
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
