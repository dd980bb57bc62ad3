"""The training loop: optimiser, schedule, validation, checkpoints every epoch, time budget, DDP.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import set_determinism
from torch.nn.parallel import DistributedDataParallel

from pipeline import cpus
from pipeline.config import PipelineConfig, TrainConfig
from pipeline.data import PreprocessedCase, mirror_swaps
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
from pipeline.training.nonfinite import NonFiniteSteps
from pipeline.training.parts import TrainParts, build_parts, unwrap
from pipeline.training.patches import PatchStream, patch_loader
from pipeline.training.progress import TrainingProgress
from pipeline.training.validation import ValidationBudget, validate

logger = logging.getLogger(__name__)

MetricLogger = Callable[[dict[str, float], int], None]

#: The training clock (the budget's): one name, so a test can run a training on a clock it controls.
_clock = time.monotonic


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
        precision: what the forward pass ran in: ``float32``, ``bfloat16`` or ``float16`` (``train.amp``);
            ``float32`` after a fall-back.
        skipped_steps: steps skipped because their loss or gradients were not finite.
        fell_back_to_float32: repeated non-finite bfloat16 steps switched the run to float32.
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
    precision: str = "float32"
    skipped_steps: int = 0
    fell_back_to_float32: bool = False


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
    return cpus.data_workers(configured, device.type, cpus.cpu_budget().per_job)


def load_cases(cases: Sequence[PreprocessedCase]) -> list[dict[str, Any]]:
    """The preprocessed arrays of ``cases``, as the patch stream and validation take them.

    Args:
        cases: preprocessed cases (a subset of the prepared dataset).

    Returns:
        One ``{"image": ..., "label": ...}`` dict per case, in order.
    """
    return [dict(zip(("image", "label"), c.load())) for c in cases]


@dataclass
class _State:
    """What changes as training goes; ``last.pt`` stores it and ``resume`` restores it."""

    start_epoch: int = 0
    best_dice: float = -1.0
    elapsed_before: float = 0.0  # training time of the runs this one resumes
    start: float = 0.0  # time.monotonic() when this run's first epoch began
    stopped: bool = False  # by the time budget
    patches: int = 0  # trained on in this run, over all processes
    nonfinite: NonFiniteSteps = field(default_factory=NonFiniteSteps)

    def elapsed(self) -> float:
        return self.elapsed_before + _clock() - self.start


@dataclass
class _Run:
    """What every epoch of one training run uses, fixed before the first one."""

    cfg: PipelineConfig
    env: distributed.DistEnv
    device: torch.device
    parts: TrainParts
    base: dict[str, Any]  # what every checkpoint stores beside the weights
    best_path: Path
    last_path: Path
    iterations: int  # per epoch
    budget_s: float | None
    val_data: list[dict[str, Any]]  # empty off rank 0: only rank 0 validates
    labels: list[int]  # the foreground label values
    log_metrics: MetricLogger | None
    extra_state: dict[str, Any] | None
    val_budget: ValidationBudget  # which passes, on which cases, fit the time budget

    def train_budget_s(self) -> float | None:
        """When training stops: the budget less what the last validation pass needs (see ``ValidationBudget``)."""
        return self.budget_s - self.val_budget.reserve_s() if self.budget_s else None


def _init_process(t: TrainConfig) -> tuple[torch.device, distributed.DistEnv]:
    """Pick the device, join the process group under ``torchrun``, seed, and set the CPU threads."""
    device = resolve_device(t.device)
    env = distributed.init(device.type)
    if env.enabled and device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
    _seed_everything(t.seed)
    # The CPUs this process may use, shared with the other ranks on this host (pipeline/cpus.py); a job the CLI
    # started has taken its share already, and keeps it up to date with the jobs beside it.
    if cpus.live_plan() is None:
        cpus.apply(cpus.plan_threads(t.num_threads, "train.num_threads"))
    return device, env


def _restore(parts: TrainParts, last_path: Path, epochs: int) -> _State:
    """Load ``last.pt``'s weights, optimiser, scaler and torch RNG into ``parts`` and return its training state."""
    saved = load_checkpoint(last_path)
    parts.network.load_state_dict(saved["state_dict"])
    parts.optimizer.load_state_dict(saved["optimizer"])
    parts.scaler.load_state_dict(saved["scaler"])
    torch.set_rng_state(saved["torch_rng"])
    if parts.ema is not None and "ema" in saved:
        parts.ema.load_state_dict(saved["ema"])
    state = _State(int(saved["epoch"]), float(saved["best_val_dice"]), float(saved["elapsed_s"]))
    state.nonfinite = NonFiniteSteps(skipped=int(saved.get("skipped_steps", 0)),
                                     fell_back=bool(saved.get("fell_back_to_float32", False)))
    if state.nonfinite.fell_back:
        parts.amp_dtype = None  # this machine's bfloat16 already failed this run: resume as it ended, in float32
    if saved.get("stopped_by_budget"):
        state.start_epoch = epochs  # the budget was spent: nothing left to train
    return state


def _checkpoint_base(cfg: PipelineConfig, plan: dict[str, Any], kwargs: dict[str, Any],
                     patch_size: list[int]) -> dict[str, Any]:
    """What every checkpoint stores beside the weights: the network, the plan and the inference settings."""
    stored = InferenceSettings.from_config(cfg)
    return {"model": kwargs, "plan": plan, "patch_size": patch_size,
            "inference": inference_section(stored, plan, validated=False)}


def _train_epoch(run: _Run, state: _State, batches: Iterator[Any], epoch: int) -> dict[str, float]:
    """One epoch's training iterations; returns its mean loss and learning rate.

    Sets ``state.stopped`` when the time budget runs out (on every process together).
    """
    t, parts, device = run.cfg.train, run.parts, run.device
    progress = max(epoch / t.epochs, state.elapsed() / run.budget_s if run.budget_s else 0.0)
    for group in parts.optimizer.param_groups:
        group["lr"] = t.learning_rate * _lr_factor(progress)
    parts.network.train()
    losses: list[float] = []
    for iteration in range(run.iterations):
        cpus.rebalance()
        image, label = next(batches)
        image, label = image.to(device, non_blocking=True), label.to(device, non_blocking=True)
        if run.cfg.model.spatial_dims == 2:
            image, label = image[..., 0], label[..., 0]
        loss = parts.forward_loss(image, label)
        value = float(loss.detach())
        # Every process decides together: one rank's NaN would otherwise hang the others in all-reduce. The
        # gradient norm is the same on every rank (taken after DDP's all-reduce), so step() agrees too.
        taken = not distributed.any_true(not math.isfinite(value))
        parts.nonfinite_grads = []
        if taken:
            parts.backward(loss)
            taken = parts.step()
        else:
            parts.optimizer.zero_grad(set_to_none=True)
        if _after_step(run, state, taken, epoch, iteration, value):
            losses.append(value)
        state.patches += image.shape[0] * run.env.world_size
        if run.budget_s and distributed.any_true(state.elapsed() > run.train_budget_s()):
            state.stopped = True
            break
    # An epoch whose every step was skipped has no loss to report (NaN, not an error: it is counted).
    return {"train_loss": float(np.mean(losses)) if losses else math.nan, "lr": parts.optimizer.param_groups[0]["lr"]}


def _after_step(run: _Run, state: _State, taken: bool, epoch: int, iteration: int, value: float) -> bool:
    """Count a step that was not taken, switch to float32 or stop on repeated ones; ``True`` when it was taken."""
    parts = run.parts
    action = state.nonfinite.record(taken, parts.amp_dtype == torch.bfloat16)
    if action == "ok":
        return True
    where = f"epoch {epoch + 1}, iteration {iteration + 1}"
    if action == "fail":
        raise TrainingFailedError(
            f"training diverged at {where}: the loss or its gradients stayed non-finite for "
            f"{state.nonfinite.fail_after} steps in float32 (last loss {value}); lower train.learning_rate or check "
            f"the data. The last good state is {run.last_path.name} of epoch {epoch}"
        )
    if action == "fall_back":
        parts.amp_dtype = None
        if run.env.is_main:
            logger.warning("bfloat16 gave non-finite steps %d times (the last at %s): training goes on in float32 "
                           "(slower; set train.amp: false to start so)", state.nonfinite.skipped, where)
    else:
        grads = parts.nonfinite_grads
        # One line per skipped step (they are rare). Back-propagation spreads a NaN towards the input, so the
        # parameter nearest the output whose gradient is not finite is where it began.
        why = (f"non-finite gradients in {len(grads)} parameters, the nearest the output {grads[-1]}" if grads
               else "the loss is not finite" if not math.isfinite(value)
               else "the gradients' norm overflows (finite gradients beyond 1e19)")
        logger.info("step skipped at %s: %s", where, why)
    return False


def _end_epoch(run: _Run, state: _State, epoch: int, metrics: dict[str, float], progress: TrainingProgress) -> None:
    """Rank 0 after an epoch: validate when due (``best.pt`` on a better Dice), log the metrics, write ``last.pt``."""
    t, parts = run.cfg.train, run.parts
    model = parts.exported()
    last_epoch = epoch + 1 == t.epochs or state.stopped
    if run.val_data and run.val_budget.needs_replan:
        vb = run.val_budget
        epoch_s = (state.elapsed() - state.elapsed_before - vb.spent_s) / max(1, epoch + 1 - state.start_epoch)
        before = vb.plan
        if vb.replan(epoch_s, state.elapsed()) != before:
            _log_validation_plan(run)
    if run.val_data and run.val_budget.due(epoch, last_epoch):
        plan, started = run.val_budget.plan, _clock()
        per_label = validate(model, [run.val_data[i] for i in plan.cases], run.cfg, run.base["patch_size"], run.labels,
                             run.device, overlap=plan.overlap)
        run.val_budget.record(_clock() - started)
        metrics["val_dice"] = float(np.mean(list(per_label.values())))
        metrics.update({f"val_dice_{v}": d for v, d in per_label.items()})
        if metrics["val_dice"] > state.best_dice:
            state.best_dice = metrics["val_dice"]
            save_checkpoint({**run.base, "state_dict": model.state_dict(), "val_dice": state.best_dice,
                             "epoch": epoch + 1}, run.best_path)
    progress.epoch_done(epoch, state.patches, metrics)
    # Metrics before the checkpoint: a crash in between redoes (and re-logs) this epoch instead of losing it.
    if run.log_metrics:
        run.log_metrics(metrics, epoch + 1)
    save_checkpoint({
        **run.base, "state_dict": unwrap(parts.network).state_dict(), "epoch": epoch + 1,
        "optimizer": parts.optimizer.state_dict(), **({"ema": parts.ema.state_dict()} if parts.ema is not None else {}),
        "scaler": parts.scaler.state_dict(), "torch_rng": torch.get_rng_state(), "best_val_dice": state.best_dice,
        "skipped_steps": state.nonfinite.skipped, "fell_back_to_float32": state.nonfinite.fell_back,
        "elapsed_s": state.elapsed(), "stopped_by_budget": state.stopped, **(run.extra_state or {}),
    }, run.last_path)


def _calibrate_validation(run: _Run) -> None:
    """Before the first step: time one validation case (no overlap), so the last pass is planned into the budget."""
    vb = run.val_budget
    case, started = vb.calibration_case(), _clock()
    validate(run.parts.exported(), [run.val_data[case]], run.cfg, run.base["patch_size"], run.labels, run.device,
             overlap=0.0)
    plan = vb.calibrate(_clock() - started, 0.0)
    if (len(plan.cases), plan.overlap, plan.every) != (len(run.val_data), run.cfg.evaluate.overlap, run.cfg.train.val_every):
        _log_validation_plan(run)


def _log_validation_plan(run: _Run) -> None:
    """Say how the in-training validation differs from the config's (a warning: the config asked otherwise)."""
    vb = run.val_budget
    plan = vb.plan
    logger.warning("in-training validation planned into the time budget: %d of %d validation cases, overlap %.2f, "
                   "every %s epochs (about %.0f s a pass; training stops %.0f s early for the last one)",
                   len(plan.cases), len(run.val_data), plan.overlap,
                   plan.every if plan.every < 10**9 else "(last only)", plan.pass_s, vb.reserve_s())


def _run_epochs(run: _Run, state: _State, batches: Iterator[Any]) -> int:
    """The epochs left to train, each ended on rank 0 and then by a barrier; returns the epochs completed."""
    t, env = run.cfg.train, run.env
    state.start = _clock()
    progress = TrainingProgress(state.start_epoch, t.epochs, run.budget_s, env.is_main, state.elapsed)
    epoch = state.start_epoch
    if run.val_data and run.val_budget.needs_calibration and t.epochs > state.start_epoch:
        _calibrate_validation(run)
    try:
        for epoch in range(state.start_epoch, t.epochs):
            metrics = _train_epoch(run, state, batches, epoch)
            if env.is_main:
                _end_epoch(run, state, epoch, metrics, progress)
            distributed.barrier()
            if state.stopped:
                break
    finally:
        progress.close()  # also on an error: its one line must not land on the bar's line
    return epoch + 1 if t.epochs > state.start_epoch else state.start_epoch


def _finish(run: _Run, state: _State, completed: int) -> TrainResult:
    """Write ``final.pt`` (and ``best.pt`` when no validation wrote one) and gather every process's checksum."""
    model = run.parts.exported()
    final_path = run.best_path.with_name("final.pt")
    if run.env.is_main:
        save_checkpoint({**run.base, "state_dict": model.state_dict(), "epoch": completed}, final_path)
        if not run.best_path.is_file():
            save_checkpoint({**run.base, "state_dict": model.state_dict(), "val_dice": state.best_dice,
                             "epoch": completed}, run.best_path)
    checksum = float(sum(p.detach().double().sum().item() for p in model.parameters()))
    checksums = distributed.gather(checksum)
    run_s = _clock() - state.start
    return TrainResult(run.best_path, run.last_path, final_path, state.best_dice, completed, state.stopped,
                       state.elapsed(), state.patches / run_s if run_s > 0 else 0.0, checksums,
                       run.parts.precision, state.nonfinite.skipped, state.nonfinite.fell_back)


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
    device, env = _init_process(t)
    if cfg.evaluate.mirror and not InferenceSettings.from_config(cfg).mirror and env.is_main:
        logger.warning("train.augment is false: the network never sees a flipped patch, so this model validates "
                       "and is stored without test-time mirroring (evaluate.mirror does not apply)")
    net_plan = plan["network"]
    patch_size, batch_size = list(net_plan["patch_size"]), int(net_plan["batch_size"])
    labels = sorted(int(k) for k in plan["labels"] if int(k) != 0)
    kwargs = model_kwargs(cfg, plan)
    parts = build_parts(t, kwargs, device)
    best_path, last_path = checkpoint_dir / "best.pt", checkpoint_dir / "last.pt"
    state = _restore(parts, last_path, t.epochs) if resume and last_path.is_file() else _State()
    if env.enabled:
        parts.network = DistributedDataParallel(parts.network, device_ids=[device.index] if device.type == "cuda" else None)

    train_data = load_cases(train_cases)
    val_data = load_cases(val_cases) if env.is_main else []
    transforms = train_transforms(cfg, patch_size, mirror_swaps(plan))
    iterations = t.iterations_per_epoch or max(1, math.ceil(len(train_data) / (batch_size * env.world_size)))
    budget_s = t.time_budget_minutes * 60 if t.time_budget_minutes else None
    workers = _num_workers(t.num_workers, device)
    val_budget = ValidationBudget([c["image"].shape[1:] for c in val_data], patch_size, cfg.model.spatial_dims,
                                  cfg.evaluate.overlap, t.val_every, budget_s)
    run = _Run(cfg, env, device, parts, _checkpoint_base(cfg, plan, kwargs, patch_size), best_path, last_path,
               iterations, budget_s, val_data, labels, log_metrics, extra_state, val_budget)

    stream = PatchStream(train_data, transforms, t.seed, env.rank, iterations * batch_size)
    # One iterator for the whole run: workers start once and keep prefetching across epoch ends.
    batches = iter(patch_loader(stream, state.start_epoch, t.epochs, batch_size, workers, device.type == "cuda"))
    completed = _run_epochs(run, state, batches)
    del batches  # stops the loader's workers
    return _finish(run, state, completed)
