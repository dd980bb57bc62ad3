"""How close a benchmark runs to the hardware's limit: FLOP counted, the CPU's peak, and the ratio.

Every speed figure of the project (``scripts/bench_inference.py``, ``scripts/bench_predict.py``,
``scripts/profile_training.py``) is said against what the machine can do:

* the work, counted once with :class:`torch.utils.flop_counter.FlopCounterMode` (an FMA counts 2): the
  forward pass of one window for inference (:func:`forward_flops`), the forward and backward pass of one
  batch for a training step (:func:`count_flops` around the step);
* the peak for the precision used (:func:`cpu_peak`): cores x FLOP per core per cycle x clock, from what
  the CPU reports (``/proc/cpuinfo`` vendor, family, flags and ``cpu MHz``, or cpufreq's
  ``cpuinfo_max_freq`` when the kernel has it), for the cores this process may use (its affinity mask);
* the achieved GFLOP/s and the ratio, in one line (:func:`achieved_line`).

The FLOP per cycle are the vector units' (:func:`flop_per_cycle`): AMD Zen 4 32 FP32 (two 256-bit FMA pipes;
AVX-512 double-pumped) and 64 BF16 (``VDPBF16PS``); Intel with AVX-512 64 FP32 (two 512-bit FMA units assumed;
some parts have one), BF16 through AVX512_BF16 no faster, through AMX (``amx_bf16``) about 1024; AVX2 with FMA
32 FP32. A peak is an upper bound no convolution reaches: it is the yardstick, not a target.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CPUINFO = Path("/proc/cpuinfo")
CPUFREQ = "/sys/devices/system/cpu/cpu{cpu}/cpufreq/cpuinfo_max_freq"
#: Accepted spellings of a precision, by the short name the lines print.
PRECISIONS = {"float32": "fp32", "fp32": "fp32", "bfloat16": "bf16", "bf16": "bf16"}


@dataclass(frozen=True)
class CpuModel:
    """What ``/proc/cpuinfo`` says about the first processor.

    Args:
        vendor: ``vendor_id`` (``AuthenticAMD``, ``GenuineIntel``), empty when absent (e.g. ARM).
        family: ``cpu family`` (AMD Zen 3 and 4: 25, Zen 5: 26), 0 when absent.
        model: ``model``, 0 when absent.
        name: ``model name``.
        flags: the instruction-set flags.
        mhz: ``cpu MHz`` (the current or, in a VM, the nominal clock), 0.0 when absent.
        threads_per_core: ``siblings`` / ``cpu cores`` (2 with SMT), 1 when absent.
    """

    vendor: str
    family: int
    model: int
    name: str
    flags: frozenset[str]
    mhz: float
    threads_per_core: int


@dataclass(frozen=True)
class Peak:
    """The peak FLOP rate of the cores a process may use, for one precision, and how it was derived.

    Args:
        precision: ``fp32`` or ``bf16``.
        gflops: the peak in GFLOP/s; ``None`` when this CPU is not one the rules know.
        cores: physical cores counted.
        flop_per_cycle: FLOP per core per cycle for the precision.
        ghz: the clock counted.
        how: the derivation in one line, e.g. ``peak 332 GFLOP/s bf16 = 2 cores x 64 FLOP/cycle x 2.6 GHz (...)``.
    """

    precision: str
    gflops: float | None
    cores: int
    flop_per_cycle: int | None
    ghz: float | None
    how: str

    def ratio(self, achieved_gflops: float) -> float | None:
        """Achieved over peak (``None`` without a peak).

        Args:
            achieved_gflops: the measured rate in GFLOP/s.
        """
        return achieved_gflops / self.gflops if self.gflops else None


def parse_cpuinfo(text: str) -> CpuModel:
    """The first processor of a ``/proc/cpuinfo`` text.

    Args:
        text: the file's content.
    """
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:  # the first processor's block ends at its blank line
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())

    def number(key: str, default: float) -> float:
        try:
            return float(fields[key])
        except (KeyError, ValueError):
            return default

    siblings, cores = number("siblings", 0), number("cpu cores", 0)
    return CpuModel(vendor=fields.get("vendor_id", ""), family=int(number("cpu family", 0)),
                    model=int(number("model", 0)), name=fields.get("model name", ""),
                    flags=frozenset((fields.get("flags") or fields.get("Features") or "").split()),
                    mhz=number("cpu MHz", 0.0),
                    threads_per_core=max(1, int(siblings // cores)) if siblings and cores else 1)


def flop_per_cycle(cpu: CpuModel, precision: str) -> tuple[int, str] | None:
    """FLOP per core per cycle of the CPU's vector units for ``precision``, and the rule that gave it.

    Args:
        cpu: what ``/proc/cpuinfo`` says.
        precision: ``float32``/``fp32`` or ``bfloat16``/``bf16``.

    Returns:
        ``(FLOP per cycle, the rule in words)``, or ``None`` for a CPU without x86 FMA flags (the rules
        know only x86).
    """
    bf16 = PRECISIONS[precision] == "bf16"
    flags, amd = cpu.flags, cpu.vendor == "AuthenticAMD"
    if "avx512f" in flags and amd and cpu.family == 25:
        if bf16 and "avx512_bf16" in flags:
            return 64, "AMD Zen 4: AVX-512 BF16 VDPBF16PS"
        return 32, "AMD Zen 4: two 256-bit FMA pipes, AVX-512 double-pumped" + (", no native bf16" if bf16 else "")
    if "avx512f" in flags and amd:
        # Zen 5 (family 26) executes AVX-512 on full 512-bit pipes (its mobile parts do not: half this).
        if bf16 and "avx512_bf16" in flags:
            return 128, f"AMD family {cpu.family} (Zen 5): 512-bit VDPBF16PS assumed"
        return 64, f"AMD family {cpu.family} (Zen 5): two 512-bit FMA pipes assumed"
    if "avx512f" in flags:
        if bf16 and "amx_bf16" in flags:
            return 1024, "Intel AMX: TDPBF16PS tiles"
        if bf16 and "avx512_bf16" in flags:
            return 64, "Intel AVX-512: two 512-bit FMA units assumed; AVX512_BF16 no faster than FP32"
        return 64, "Intel AVX-512: two 512-bit FMA units assumed" + (", no native bf16" if bf16 else "")
    if "avx2" in flags and "fma" in flags:
        return 32, "AVX2+FMA: two 256-bit FMA units" + (", no native bf16" if bf16 else "")
    if "avx" in flags:
        return 16, "AVX without FMA: one 256-bit multiply and one add per cycle"
    return None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (``taskset``, Slurm's binding), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _max_clock_khz(cpu: int = 0) -> int | None:
    """cpufreq's highest clock of ``cpu`` in kHz (absent in most VMs)."""
    try:
        return int(Path(CPUFREQ.format(cpu=cpu)).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def cpu_peak(precision: str = "float32", threads: int | None = None, *, cpuinfo: str | None = None,
             cpus: int | None = None, max_khz: int | None = -1) -> Peak:
    """The peak FLOP rate of the cores this process may use, for ``precision``.

    Args:
        precision: ``float32``/``fp32`` or ``bfloat16``/``bf16``: what the network's convolutions run in.
        threads: compute threads the benchmark ran with, when fewer than its CPUs (then only those count).
        cpuinfo: a ``/proc/cpuinfo`` text (default: this machine's).
        cpus: logical CPUs usable (default: the affinity mask's, :func:`usable_cpus`).
        max_khz: the highest clock in kHz (default ``-1``: cpufreq's ``cpuinfo_max_freq`` when present;
            ``None``: none, so ``cpu MHz`` counts).
    """
    short = PRECISIONS[precision]
    cpu = parse_cpuinfo(CPUINFO.read_text() if cpuinfo is None else cpuinfo)
    logical = usable_cpus() if cpus is None else cpus
    if threads:
        logical = min(logical, threads)
    # SMT siblings share one core's vector units: two logical CPUs of one core are one core's peak.
    cores = max(1, math.ceil(logical / cpu.threads_per_core))
    khz = _max_clock_khz(min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0) \
        if max_khz == -1 else max_khz
    ghz, clock = (khz / 1e6, "clock: cpufreq's cpuinfo_max_freq") if khz else (
        (cpu.mhz / 1e3, "clock from /proc/cpuinfo") if cpu.mhz else (None, "no clock reported"))
    if not khz and cpu.mhz and "hypervisor" in cpu.flags:
        # A guest's "cpu MHz" is the time-stamp counter's rate; the host may boost the cores well above it
        # (on one KVM Zen 4 a matrix product ran at 1.17x this peak).
        clock += ", a VM's time-stamp counter rate: the cores may run faster and the ratio read high"
    rule = flop_per_cycle(cpu, precision)
    if rule is None or ghz is None:
        why = "no x86 FMA flags in /proc/cpuinfo" if rule is None else clock
        return Peak(short, None, cores, rule[0] if rule else None, ghz, f"peak unknown for {short}: {why}")
    per_cycle, words = rule
    gflops = cores * per_cycle * ghz
    smt = f", {cpu.threads_per_core} threads per core" if cpu.threads_per_core > 1 else ""
    counted = f"{cores} {'core' if cores == 1 else 'cores'}"
    how = (f"peak {gflops:.0f} GFLOP/s {short} = {counted} x {per_cycle} FLOP/cycle x {ghz:.1f} GHz "
           f"({words}; {clock}{smt})")
    return Peak(short, gflops, cores, per_cycle, ghz, how)


def count_flops(step: Callable[[], Any]) -> int:
    """FLOP of whatever ``step`` runs in PyTorch (convolutions and matrix products; an FMA counts 2).

    Args:
        step: called once under :class:`~torch.utils.flop_counter.FlopCounterMode`; a training step
            runs its forward pass and ``backward()`` inside it, so both are counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def _on_meta(network: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``network`` on the meta device: shapes without data, so counting costs no arithmetic."""
    return copy.deepcopy(network).to("meta")


def forward_flops(network: torch.nn.Module, input_shape: Sequence[int]) -> int:
    """FLOP of one forward pass of ``network`` (in eval mode, as inference runs it) on ``input_shape``.

    Counted on a copy on the meta device, so the network itself is untouched and no arithmetic is done.

    Args:
        network: the network.
        input_shape: ``(batch, channels, *spatial)``: one window is batch 1.
    """
    meta = _on_meta(network).eval()
    x = torch.zeros(tuple(input_shape), device="meta")
    with torch.inference_mode():
        return count_flops(lambda: meta(x))


def _every_output(outputs: torch.Tensor | Sequence[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
    """A loss that reaches every output (each deep-supervision level), for counting: losses do no convolution."""
    return sum((o.float().mean() for o in ([outputs] if isinstance(outputs, torch.Tensor) else outputs)),
               torch.zeros((), device=label.device))


def training_step_flops(network: torch.nn.Module, loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None,
                        input_shape: Sequence[int]) -> int:
    """FLOP of one training step's forward and backward pass (the optimiser's few element-wise FLOP aside).

    Counted on a copy on the meta device (the network and its gradients are untouched), with an all-background
    label: the FLOP depend on the shapes only.

    Args:
        network: the network as it trains (deep supervision included when on).
        loss_fn: the training loss, called as ``loss_fn(network(image), label)``; ``None``: the mean of every
            output, which counts the same (a Dice or cross-entropy loss does no matrix product).
        input_shape: ``(batch, channels, *spatial)``: the plan's batch of patches.
    """
    loss_fn = loss_fn or _every_output
    meta = _on_meta(network).train()
    image = torch.zeros(tuple(input_shape), device="meta")
    label = torch.zeros((input_shape[0], 1, *input_shape[2:]), dtype=torch.long, device="meta")
    return count_flops(lambda: loss_fn(meta(image), label).backward())


def achieved_line(label: str, flop: float, seconds: float, peak: Peak) -> str:
    """One line: the achieved GFLOP/s of ``flop`` done in ``seconds``, the peak and the ratio.

    Args:
        label: what was measured (``training``, ``ours``, ...).
        flop: the FLOP done.
        seconds: the wall time it took.
        peak: :func:`cpu_peak` for the precision it ran in.
    """
    achieved = flop / seconds / 1e9
    ratio = peak.ratio(achieved)
    if ratio is None:
        return f"{label}: {achieved:.1f} GFLOP/s {peak.precision} achieved; {peak.how}"
    return (f"{label}: {achieved:.1f} GFLOP/s {peak.precision} achieved of {peak.gflops:.0f} peak: "
            f"ratio to peak {ratio:.2f}")
