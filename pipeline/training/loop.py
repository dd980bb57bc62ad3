"""The training loop: optimiser, schedule, validation, checkpoints every epoch, time budget, DDP.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.utils import set_determinism
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from models.unet import UNet
from pipeline.config import PipelineConfig
from pipeline.data import PreprocessedCase
from pipeline.errors import TrainingFailedError
from pipeline.inference import (
    InferenceSettings,
    inference_section,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.training import distributed
from pipeline.training.augmentation import train_transforms
from pipeline.training.devices import resolve_device
from pipeline.training.loss import DeepSupervisionLoss
from pipeline.training.patches import PatchStream, patch_loader
from pipeline.training.validation import validate

MetricLogger = Callable[[dict[str, float], int], None]


@dataclass
class TrainResult:
    """What a training run produced.

    Args:
        best_checkpoint: weights with the best validation Dice.
        last_checkpoint: the latest weights and the full training state (for ``--resume``).
        final_checkpoint: the weights at the end of training, without optimiser state.
        best_val_dice: mean foreground Dice of the best checkpoint on the validation cases.
        epochs: epochs completed.
        stopped_by_budget: training ended at ``train.time_budget_minutes``.
        train_seconds: wall time spent training (summed over resumes).
        patches_per_second: training throughput over all processes.
        param_checksums: per process, a checksum of the final weights (identical under DDP).
    """

    best_checkpoint: Path
    last_checkpoint: Path
    final_checkpoint: Path
    best_val_dice: float
    epochs: int
    stopped_by_budget: bool
    train_seconds: float = 0.0
    patches_per_second: float = 0.0
    param_checksums: list[float] = field(default_factory=list)


def model_kwargs(cfg: PipelineConfig, plan: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments of the U-Net for a config and plan (stored in every checkpoint).

    Args:
        cfg: the pipeline configuration.
        plan: the plan (channels, labels, and the network section with ``features``).
    """
    return {
        "spatial_dims": cfg.model.spatial_dims,
        "in_channels": len(plan["modalities"]),
        "out_channels": max(2, max(int(k) for k in plan["labels"]) + 1),
        "features": list(plan["network"]["features"]),
        "norm": cfg.model.norm,
        "deep_supervision": cfg.model.deep_supervision,
    }


def _lr_factor(progress: float) -> float:
    """nnU-Net's polynomial decay."""
    return (1.0 - min(progress, 1.0)) ** 0.9


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    set_determinism(seed=seed)


def _num_workers(configured: int | None, device: torch.device) -> int:
    if configured is not None:
        return configured
    # On a CPU the network needs every core; on a GPU, augmentation must keep up with it.
    return 0 if device.type == "cpu" else max(1, min(8, (os.cpu_count() or 2) - 1))


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    return network.module if isinstance(network, DistributedDataParallel) else network


def train(
    cfg: PipelineConfig,
    plan: dict[str, Any],
    train_cases: Sequence[PreprocessedCase],
    val_cases: Sequence[PreprocessedCase],
    checkpoint_dir: Path,
    log_metrics: MetricLogger | None = None,
    resume: bool = False,
    extra_state: dict[str, Any] | None = None,
) -> TrainResult:
    """Train a U-Net on preprocessed cases; under ``torchrun``, with DistributedDataParallel.

    Every epoch writes ``last.pt`` atomically with the whole training state
    (weights, optimiser, AMP scaler, torch RNG, epoch, best score, elapsed time
    and ``extra_state``); ``resume=True`` continues from it. Only rank 0 validates,
    logs and writes checkpoints.

    Args:
        cfg: the pipeline configuration.
        plan: the plan (preprocessing, and ``network`` with patch/batch/features).
        train_cases: cases to sample patches from.
        val_cases: cases scored by sliding window every ``train.val_every`` epochs.
        checkpoint_dir: where ``best.pt`` and ``last.pt`` go.
        log_metrics: called with ``({name: value}, epoch)`` after each epoch (rank 0).
        resume: continue from ``checkpoint_dir/last.pt`` when it exists.
        extra_state: stored in ``last.pt`` (e.g. the MLflow run id).
    """
    t = cfg.train
    device = resolve_device(t.device)
    env = distributed.init(device.type)
    if env.enabled and device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
    _seed_everything(t.seed)
    if t.num_threads > 0:
        torch.set_num_threads(t.num_threads)
    elif env.enabled and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.world_size))
    net_plan = plan["network"]
    patch_size, batch_size = list(net_plan["patch_size"]), int(net_plan["batch_size"])
    labels = sorted(int(k) for k in plan["labels"] if int(k) != 0)
    kwargs = model_kwargs(cfg, plan)
    network: torch.nn.Module = UNet(**kwargs).to(device)
    loss_fn = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True, batch=True))
    if t.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            network.parameters(), lr=t.learning_rate, momentum=0.99, nesterov=True, weight_decay=t.weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(network.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    use_amp = t.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)

    best_path, last_path = checkpoint_dir / "best.pt", checkpoint_dir / "last.pt"
    start_epoch, best_dice, elapsed_before = 0, -1.0, 0.0
    if resume and last_path.is_file():
        state = load_checkpoint(last_path)
        network.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, best_dice = int(state["epoch"]), float(state["best_val_dice"])
        elapsed_before = float(state["elapsed_s"])
        if state.get("stopped_by_budget"):
            start_epoch = t.epochs  # the budget was spent: nothing left to train
    if env.enabled:
        network = DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)

    train_data = [dict(zip(("image", "label"), c.load())) for c in train_cases]
    val_data = [dict(zip(("image", "label"), c.load())) for c in val_cases] if env.is_main else []
    transforms = train_transforms(cfg, patch_size)
    iterations = t.iterations_per_epoch or max(1, math.ceil(len(train_data) / (batch_size * env.world_size)))
    budget_s = t.time_budget_minutes * 60 if t.time_budget_minutes else None
    workers = _num_workers(t.num_workers, device)

    e = cfg.evaluate
    stored = InferenceSettings(mirror=e.mirror, overlap=e.overlap, mode=e.mode, sw_batch_size=e.sw_batch_size)
    base = {"model": kwargs, "plan": plan, "patch_size": patch_size,
            "inference": inference_section(stored, plan, validated=False)}
    epoch, stopped, patches = start_epoch, False, 0
    stream = PatchStream(train_data, transforms, t.seed, env.rank, iterations * batch_size)
    # One iterator for the whole run: workers start once and keep prefetching across epoch ends.
    batches = iter(patch_loader(stream, start_epoch, t.epochs, batch_size, workers, device.type == "cuda"))
    start = time.monotonic()
    bar = tqdm(range(start_epoch, t.epochs), desc="train", unit="epoch", disable=not env.is_main,
               initial=start_epoch, total=t.epochs)

    def elapsed() -> float:
        return elapsed_before + time.monotonic() - start

    for epoch in bar:
        progress = max(epoch / t.epochs, elapsed() / budget_s if budget_s else 0.0)
        for group in optimizer.param_groups:
            group["lr"] = t.learning_rate * _lr_factor(progress)
        network.train()
        losses = []
        for _ in range(iterations):
            image, label = next(batches)
            image, label = image.to(device, non_blocking=True), label.to(device, non_blocking=True)
            if cfg.model.spatial_dims == 2:
                image, label = image[..., 0], label[..., 0]
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, enabled=use_amp):
                loss = loss_fn(network(image), label)
            value = float(loss.detach())
            # Every process stops together: one rank's NaN would otherwise hang the others in all-reduce.
            if distributed.any_true(not math.isfinite(value)):
                raise TrainingFailedError(
                    f"training diverged at epoch {epoch + 1}, iteration {len(losses) + 1}: the loss is not finite "
                    f"({value}); lower train.learning_rate or check the data. The last good state is "
                    f"{last_path.name} of epoch {epoch}"
                )
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12.0)
            scaler.step(optimizer)
            scaler.update()
            losses.append(value)
            patches += image.shape[0] * env.world_size
            if budget_s and distributed.any_true(elapsed() > budget_s):
                stopped = True
                break
        metrics = {"train_loss": float(np.mean(losses)), "lr": optimizer.param_groups[0]["lr"]}
        last_epoch = epoch + 1 == t.epochs or stopped
        if env.is_main:
            model = _unwrap(network)
            if val_data and ((epoch + 1) % t.val_every == 0 or last_epoch):
                per_label = validate(model, val_data, cfg, patch_size, labels, device)
                metrics["val_dice"] = float(np.mean(list(per_label.values())))
                metrics.update({f"val_dice_{v}": d for v, d in per_label.items()})
                if metrics["val_dice"] > best_dice:
                    best_dice = metrics["val_dice"]
                    save_checkpoint({**base, "state_dict": model.state_dict(), "val_dice": best_dice,
                                     "epoch": epoch + 1}, best_path)
            bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items() if k in ("train_loss", "val_dice")})
            # Metrics before the checkpoint: a crash in between redoes (and re-logs) this epoch instead of losing it.
            if log_metrics:
                log_metrics(metrics, epoch + 1)
            save_checkpoint({
                **base, "state_dict": model.state_dict(), "epoch": epoch + 1, "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state(), "best_val_dice": best_dice,
                "elapsed_s": elapsed(), "stopped_by_budget": stopped, **(extra_state or {}),
            }, last_path)
        distributed.barrier()
        if stopped:
            break
    bar.close()
    del batches  # stops the loader's workers
    completed = epoch + 1 if t.epochs > start_epoch else start_epoch
    model = _unwrap(network)
    final_path = checkpoint_dir / "final.pt"
    if env.is_main:
        save_checkpoint({**base, "state_dict": model.state_dict(), "epoch": completed}, final_path)
        if not best_path.is_file():
            save_checkpoint({**base, "state_dict": model.state_dict(), "val_dice": best_dice, "epoch": completed},
                            best_path)
    checksum = float(sum(p.detach().double().sum().item() for p in model.parameters()))
    checksums = distributed.gather(checksum)
    run_s = time.monotonic() - start
    return TrainResult(best_path, last_path, final_path, best_dice, completed, stopped, elapsed(),
                       patches / run_s if run_s > 0 else 0.0, checksums)
