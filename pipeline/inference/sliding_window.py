"""Our sliding-window engine: windowed network outputs stitched into one volume.

Used alike by training-time validation, evaluation and ``predict``. What it does,
and why:

* **Tiles** are placed as nnU-Net places them (``placement="nnunet"``): per axis
  ``ceil((size - window) / (window * (1 - overlap))) + 1`` tiles spread evenly from 0
  to ``size - window``, made mirror-symmetric so that test-time mirroring sees the
  same tiles flipped. ``placement="monai"`` reproduces MONAI's
  ``sliding_window_inference`` exactly (scan interval ``int(window * (1 - overlap))``,
  the last tile clipped), for parity tests and the benchmark.
* **Blending**: MONAI's Gaussian importance map (sigma = ``sigma_scale`` x window,
  the same clamping of small weights) or constant weights, computed once per window
  size, device and dtype (``lru_cache``), never per call.
* **Accumulation** in place (``addcmul_``) into buffers allocated once per volume:
  float16 on CUDA (as nnU-Net), float32 on the CPU. No ``torch.cat`` of windows: each
  batch is copied into one preallocated tensor.
* **Test-time mirroring** is part of the window batches: each window goes through the
  network with every axis-flip combination in the same forward passes (not one full
  sliding-window pass per flip). The result is the mean over flips of the flipped
  volume's sliding-window prediction, i.e. exactly what running
  ``sliding_window_inference`` on each flipped volume and averaging gives; where a
  flip moves the tiles (an axis whose tiles are not symmetric), that flip gets its own
  normalisation, so the identity holds for any placement. A flip along an axis that
  maps one label onto another (a left/right organ pair, ``label_swaps`` from the plan's
  ``mirror_pairs``) swaps those output channels as it takes the pass back.
* **CUDA**: ``torch.inference_mode``, autocast (float16), ``cudnn.benchmark``, the
  volume copied to the device once from pinned memory without blocking.
* **CPU**: ``torch.compile`` (Inductor, frozen weights) once a job is long enough to
  pay for the compile (see :mod:`pipeline.inference.accelerate`). oneDNN pre-packed weights
  (``torch.utils.mkldnn``) were tried and dropped: no measurable gain over eager
  PyTorch (0.193 vs 0.194 s per batch of four 32x48x32 windows, 2 cores).
* **Out of memory on the device**: retried with the stitched buffers on the CPU
  (nnU-Net's fallback), then with ever smaller window batches; the log says which path
  ran and the result is the same. ``memory_cap_gb`` caps the device memory: on CUDA a
  real cap (``torch.cuda.set_per_process_memory_fraction``), on a CPU-only machine a
  simulation that accounts the engine's own allocations, so the fallback path can be
  exercised and tested anywhere.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map

from pipeline import cpus
from pipeline.data import flip_permutation
from pipeline.inference import accelerate, aot
from pipeline.inference.accelerate import CompileMode, Precision
from pipeline.inference.stitching import Accumulator, DeviceBudget, TilePlan, class_argmax

if TYPE_CHECKING:
    from pipeline.quality import MaskAgreement

logger = logging.getLogger(__name__)

Placement = Literal["nnunet", "monai"]
BlendMode = Literal["gaussian", "constant"]


@dataclass(frozen=True)
class WindowSettings:
    """How windows are placed, blended and batched.

    Args:
        overlap: fraction of the window shared by neighbouring tiles, in [0, 1).
        mode: ``gaussian`` (centre-weighted) or ``constant`` blending.
        sigma_scale: the Gaussian's sigma as a fraction of the window size.
        mirror: test-time augmentation: average over every combination of axis flips
            (in-plane axes only for a 2D network).
        batch_size: windows (flips included) per forward pass.
        placement: ``nnunet`` (evenly spread, mirror-symmetric) or ``monai`` (MONAI's
            scan interval; for parity with ``sliding_window_inference``).
        memory_cap_gb: cap on the compute device's memory (see the module docstring);
            ``None``: no cap.
        compile: on a CPU, run a ``torch.compile``-d copy of the network: ``auto`` once
            the process has enough windows to pay for compiling (see
            :mod:`pipeline.inference.accelerate`), ``on`` or ``off``.
        precision: on a CPU, ``float32``, ``bfloat16`` (autocast) or ``auto`` (bfloat16 where
            the CPU has a native bf16 dot product, else float32); CUDA autocasts to float16.
        compiled_cache_max_gb: the cap of the cache a compiled network is built into
            (``registry.compiled_cache_max_gb``; ``None``: no cap).
    """

    overlap: float = 0.5
    mode: BlendMode = "gaussian"
    sigma_scale: float = 0.125
    mirror: bool = True
    batch_size: int = 4
    placement: Placement = "nnunet"
    memory_cap_gb: float | None = None
    compile: CompileMode = "auto"
    precision: Precision = "float32"
    compiled_cache_max_gb: float | None = aot.DEFAULT_MAX_GB


def window_size(patch_size: Sequence[int], spatial_dims: int) -> list[int]:
    """The 3D window a model sees: a 2D model sees one slice at a time along the last axis.

    Args:
        patch_size: the training patch size (2 or 3 entries).
        spatial_dims: the model's spatial dimensions.
    """
    return [*patch_size[:2], 1] if spatial_dims == 2 else list(patch_size)


def tile_starts(size: int, window: int, overlap: float, placement: Placement = "nnunet") -> list[int]:
    """Start indices of the tiles along one axis of a volume at least ``window`` long.

    Args:
        size: the (padded) volume size along the axis, ``>= window``.
        window: the window size along the axis.
        overlap: fraction of the window shared by neighbouring tiles, in [0, 1).
        placement: ``nnunet`` or ``monai`` (see :class:`WindowSettings`).
    """
    if size < window:
        raise ValueError(f"size {size} is smaller than the window {window}: pad first")
    if placement == "monai":
        # monai.inferers.utils._get_scan_interval and monai.data.utils.dense_patch_slices, one axis.
        interval = window if window == size else max(1, int(window * (1 - overlap)))
        count = next(d for d in range(math.ceil(size / interval)) if d * interval + window >= size) + 1
        return [min(d * interval, size - window) for d in range(count)]
    span = size - window
    if span == 0:
        return [0]
    # A step below one voxel would evaluate the same tile twice (a 2D network's window is 1 slice deep).
    count = math.ceil(span / max(1.0, window * (1 - overlap))) + 1
    step = span / (count - 1)
    starts = [int(math.floor(i * step + 0.5)) for i in range(count)]
    # Mirror-symmetric where the integers allow it (an odd span with an odd count cannot be):
    # then flipping the volume maps the tiles onto themselves and mirroring needs no extra tiles.
    for i in range(count // 2):
        starts[count - 1 - i] = span - starts[i]
    return starts


@lru_cache(maxsize=16)
def importance_map(
    window: tuple[int, ...], mode: BlendMode, sigma_scale: float, device: str, dtype: torch.dtype
) -> torch.Tensor:
    """MONAI's blending weights of one window (``compute_importance_map``), cached per window size, device and dtype.

    Computed in float32 on the CPU, then moved: the same map whatever ``dtype`` the stitching uses.

    Args:
        window: the window size.
        mode: ``gaussian`` or ``constant``.
        sigma_scale: sigma as a fraction of the window size.
        device: where the map lives.
        dtype: its dtype.
    """
    weights = compute_importance_map(list(window), mode=mode, sigma_scale=sigma_scale, device="cpu",
                                     dtype=torch.float32)
    return weights.to(device=device, dtype=dtype)


class _Network:
    """The network one volume runs on: the compiled copy, or the eager network if there is none or it fails.

    ``eager`` is already wrapped for the CPU precision (:func:`pipeline.inference.aot.runnable`).
    """

    def __init__(self, eager: torch.nn.Module, fast: torch.nn.Module | None, spatial_dims: int, cuda: bool) -> None:
        self.eager, self.fast, self.spatial_dims, self.cuda = eager, fast, spatial_dims, cuda

    def __call__(self, batch: torch.Tensor, count: int) -> torch.Tensor:
        """The outputs of the first ``count`` windows of ``batch``."""
        with torch.autocast("cuda", enabled=self.cuda):
            if self.fast is None:
                return self._forward(self.eager, batch[:count])
            # Always the full batch: a smaller last batch would trigger a recompilation.
            try:
                return self._forward(self.fast, batch)[:count]
            except Exception as error:  # the compiler fails at the first call, not at torch.compile
                if isinstance(error, torch.OutOfMemoryError):
                    raise
                accelerate.compile_failed(self.eager, error)
                self.fast = None
                return self._forward(self.eager, batch[:count])

    def _forward(self, network: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        if self.spatial_dims == 2:
            return network(batch[..., 0])[..., None]
        return network(batch)


class SlidingWindowInferer:
    """Stitch a network's windowed outputs over whole volumes.

    Args:
        network: the segmentation network (``spatial_dims`` attribute: 2 or 3), in
            evaluation mode, on ``device``.
        patch_size: the training patch size (the window; 2 entries for a 2D network
            are completed with 1 along the third axis).
        settings: placement, blending, mirroring, batch size, memory cap.
        device: where the network runs.
        label_swaps: axis -> label pairs a flip along it swaps (:func:`pipeline.data.mirroring.mirror_swaps`
            of the model's plan); ``None``: none.
    """

    def __init__(
        self, network: torch.nn.Module, patch_size: Sequence[int], settings: WindowSettings, device: torch.device,
        label_swaps: Mapping[int, Sequence[tuple[int, int]]] | None = None,
    ) -> None:
        self.network = network
        self.label_swaps = dict(label_swaps or {})
        self.spatial_dims = int(getattr(network, "spatial_dims", len(patch_size)))
        self.window = window_size(patch_size, self.spatial_dims)
        self.settings = settings
        self.device = torch.device(device)
        self.windows_evaluated = 0
        self.batch_size = settings.batch_size
        self.path = ""
        #: what the network ran in on the last volume: ``float32``, ``bfloat16`` (CPU) or ``float16 autocast`` (CUDA).
        self.precision = ""
        #: volumes still to come in this job (the next included): lets ``compile="auto"`` see a batch coming.
        self.volumes_left = 1

    # ------------------------------------------------------------------ public

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Logits of a whole volume.

        Args:
            image: ``(C, X, Y, Z)`` preprocessed volume (any device).

        Returns:
            ``(num_classes, X, Y, Z)`` float32 logits on the CPU (averaged over flips with
            mirroring).
        """
        return self._infer(image, spread=False)[0]

    @torch.inference_mode()
    def with_spread(
        self, image: torch.Tensor, agreement: MaskAgreement | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of a whole volume and, per voxel, how much the passes behind them disagree.

        The spread is the standard deviation of the logit vectors around their mean, over
        every mirrored pass and overlapping window that saw the voxel (blend-weighted): zero
        where all passes agree. It costs one single-channel buffer and no extra network pass.

        With ``agreement``, each mirrored pass is stitched on its own and its label map (uint8)
        added to it: no extra network pass either, but the passes are then added up in a second
        logits-sized buffer on the CPU (one, not one per pass) where a volume whose tiles are
        mirror-symmetric needed none.

        Args:
            image: ``(C, X, Y, Z)`` preprocessed volume (any device).
            agreement: collects every mirrored pass's own label map (emptied first; one pass without mirroring).

        Returns:
            The logits as :meth:`__call__` gives them, and the ``(X, Y, Z)`` float32 spread on the CPU.
        """
        logits, squares = self._infer(image, spread=True, agreement=agreement)
        assert squares is not None
        # E|l|^2 - |E l|^2, in place and a class at a time (logits.square() would be a second copy of the
        # logits, 0.6 GB on a CT); rounding can make it a hair negative where the passes agree.
        for channel in logits:
            squares.addcmul_(channel, channel, value=-1)
        return logits, squares.clamp_(min=0).sqrt_()

    def _infer(
        self, image: torch.Tensor, spread: bool, agreement: MaskAgreement | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cap = self.settings.memory_cap_gb
        if self.device.type == "cuda" and cap is not None:
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total), self.device)
        last_error: BaseException | None = None
        for on_device, batch_size in self._attempts():
            try:
                if agreement is not None:
                    agreement.reset()  # a retry after running out of memory starts the passes again
                out = self._run(image, on_device, batch_size, spread, agreement)
                self.volumes_left = max(1, self.volumes_left - 1)
            except torch.OutOfMemoryError as error:
                last_error = error
                self._retrying(error, on_device, batch_size)
                continue
            self.path = (
                f"windows and stitching on {self.device}, {self.precision}" if on_device
                else f"fallback: windows on {self.device}, stitching in host memory, {self.batch_size} window(s) per batch"
            )
            (logger.warning if self.path.startswith("fallback") else logger.info)("sliding window: %s", self.path)
            return out
        raise self._out_of_memory(last_error)

    # ------------------------------------------------------------------ internals

    def _attempts(self) -> list[tuple[bool, int]]:
        """(stitching on the device, windows per batch) to try in turn until one fits in memory (nnU-Net's fallback)."""
        s = self.settings
        attempts = [(True, s.batch_size)]
        if self.device.type == "cuda" or s.memory_cap_gb is not None:
            attempts.append((False, s.batch_size))
            size = s.batch_size // 2
            while size >= 1:
                attempts.append((False, size))
                size //= 2
        return attempts

    def _retrying(self, error: torch.OutOfMemoryError, on_device: bool, batch_size: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        logger.warning(
            "sliding window: out of memory on %s with stitching %s and %d window(s) per batch (%s); retrying",
            self.device, "on the device" if on_device else "in host memory", batch_size,
            str(error).splitlines()[0][:160],
        )

    def _out_of_memory(self, last_error: BaseException | None) -> Exception:
        """The one error for a volume that no attempt could fit in memory."""
        from pipeline.errors import PipelineError

        advice = "use --device cpu" if self.device.type == "cuda" else "raise --device-memory-gb"
        return PipelineError(
            f"out of memory on {self.device} even with the stitching in host memory and one window per batch "
            f"({str(last_error).splitlines()[0][:160]}); {advice}"
        )

    def _flips(self) -> list[tuple[int, ...]]:
        if not self.settings.mirror:
            return [()]
        axes = range(2) if self.spatial_dims == 2 else range(3)
        return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]

    def _plan(self, size: list[int]) -> TilePlan:
        s, window = self.settings, self.window
        # Volumes smaller than the window are padded with zeros, the smaller half first (as MONAI does).
        # A flipped volume is padded the same way *after* flipping, so in the original frame its padding
        # is mirrored: the buffer gets the larger half on both sides and windows are placed by their
        # start ``q`` in original coordinates (negative where they begin in the padding).
        pad = [max(w - n, 0) for w, n in zip(window, size)]
        margin = [(p + 1) // 2 for p in pad]
        starts = [tile_starts(n + p, w, s.overlap, s.placement) for n, p, w in zip(size, pad, window)]
        groups: dict[tuple, list[tuple[int, ...]]] = {}
        for flip in self._flips():
            key = tuple(
                tuple(sorted(n - w - t + p // 2 + m for t in axis)) if a in flip else tuple(t - p // 2 + m for t in axis)
                for a, (axis, n, w, p, m) in enumerate(zip(starts, size, window, pad, margin))
            )
            groups.setdefault(key, []).append(flip)
        return TilePlan(size, window, margin, groups)

    def _to_device(self, image: torch.Tensor, margin: list[int], budget: DeviceBudget) -> torch.Tensor:
        """The volume as float32 on the device, padded by ``margin`` on both sides of each axis."""
        budget.take(image.numel() * 4, "the input volume")
        x = image.float()
        if self.device.type == "cuda" and x.device.type == "cpu":
            x = x.pin_memory().to(self.device, non_blocking=True)
        else:
            x = x.to(self.device)
        if any(margin):
            x = F.pad(x, [v for m in reversed(margin) for v in (m, m)])
        return x

    def _network_for(self, jobs_total: int, batch_size: int, channels: int) -> _Network:
        fast = None
        cpu, cuda = self.device.type == "cpu", self.device.type == "cuda"
        self.precision = accelerate.cpu_precision(self.settings.precision) if cpu else (
            "float16 autocast" if cuda else "float32")
        if cpu and self.settings.compile != "off":
            shape = (batch_size, channels, *self.window[: self.spatial_dims])
            # A package compiled earlier costs nothing to use, even for one small volume.
            fast = accelerate.ahead_of_time(self.network, shape, self.precision)
            if fast is None and accelerate.should_compile(self.network, jobs_total, self.settings.compile,
                                                          self.volumes_left):
                fast = accelerate.compiled(self.network, shape, self.precision, self.settings.compiled_cache_max_gb)
        eager = aot.runnable(self.network, self.precision) if cpu else self.network
        return _Network(eager, fast, self.spatial_dims, cuda)

    @torch.inference_mode()
    def _run(
        self, image: torch.Tensor, results_on_device: bool, batch_size: int, spread: bool = False,
        agreement: MaskAgreement | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = self.settings
        cuda = self.device.type == "cuda"
        budget = DeviceBudget(int(s.memory_cap_gb * 2**30) if s.memory_cap_gb is not None and not cuda else None)
        if cuda:
            torch.backends.cudnn.benchmark = True

        channels, *size = image.shape
        plan = self._plan(size)
        x = self._to_device(image, plan.margin, budget)
        results_device = self.device if results_on_device else torch.device("cpu")
        # Each pass its own group when its mask is wanted: the flips sharing tiles are then stitched one at a time.
        groups = [(key, [flip]) for key, flips in plan.groups.items() for flip in flips] if agreement is not None else \
            list(plan.groups.items())
        weight_map = importance_map(tuple(self.window), s.mode, s.sigma_scale, str(self.device), torch.float32)
        # Only buffers on the compute device count against its cap.
        stitched = Accumulator(plan, list(x.shape[1:]), weight_map, results_device, budget if results_on_device else None,
                                spread, groups=len(groups))
        # No bigger batches than there are windows (a small volume may need a single one).
        batch_size = min(batch_size, plan.jobs_total)
        self.batch_size = batch_size
        network = self._network_for(plan.jobs_total, batch_size, channels)

        batch_in = torch.empty((batch_size, channels, *self.window), device=self.device)
        budget.take(batch_in.numel() * 4 * 2, "one batch of windows")
        budget.take(self._activation_bytes(batch_size, channels), "the network's activations for one batch")
        self.windows_evaluated = 0
        perms: dict[tuple[int, ...], list[int] | None] = {}
        for key, flips in groups:
            jobs = plan.jobs(key, flips)
            stitched.start_group()
            for first in range(0, len(jobs), batch_size):
                chunk = jobs[first : first + batch_size]
                cpus.rebalance()  # a job started or ended beside this one: take the new share of the CPUs
                for i, (pos, flip) in enumerate(chunk):
                    win = x[(slice(None), *plan.tile(pos))]
                    batch_in[i].copy_(torch.flip(win, [d + 1 for d in flip]) if flip else win)
                pred = network(batch_in, len(chunk))
                if self.label_swaps:
                    pred = self._swap_labels(pred, chunk, perms)
                self.windows_evaluated += len(chunk)
                stitched.add(pred, chunk, flips[0])
            part = stitched.end_group()
            if agreement is not None:
                agreement.add(class_argmax(part[(slice(None), *plan.crop())]))
        flips = len(self._flips())
        return stitched.result(flips), stitched.mean_squares(flips)

    def _swap_labels(self, pred: torch.Tensor, chunk: list, perms: dict[tuple[int, ...], list[int] | None]) -> torch.Tensor:
        """A flipped pass's left/right channels swapped back (the flip made the left organ look like the right one)."""
        for i, (_, flip) in enumerate(chunk):
            if flip not in perms:
                perms[flip] = flip_permutation(self.label_swaps, flip, pred.shape[1])
            perm = perms[flip]
            if perm is not None:
                pred[i] = pred[i, perm]
        return pred

    def _activation_bytes(self, batch_size: int, channels: int) -> int:
        """A rough upper bound of one batch's activations (the CPU simulation's only estimate)."""
        features = getattr(self.network, "features", (32,))
        voxels = math.prod(self.window)
        per_level = sum(f / 2 ** (self.spatial_dims * i) for i, f in enumerate(features))
        return int(batch_size * voxels * (channels + 3 * per_level) * 4)
