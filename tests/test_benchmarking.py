"""The hardware's limit: the CPU's peak from what it reports, FLOP counted, and the ratio line."""

from __future__ import annotations

import pytest
import torch

from models.unet import UNet
from pipeline.benchmarking import (
    achieved_line,
    count_flops,
    cpu_peak,
    forward_flops,
    parse_cpuinfo,
    training_step_flops,
)


def _cpuinfo(vendor: str, family: int, model: int, flags: str, mhz: float = 2600.0, siblings: int = 2,
             cores: int = 2) -> str:
    """A ``/proc/cpuinfo`` of two processors (only the first is read)."""
    block = (f"processor\t: {{n}}\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n"
             f"model name\t: test cpu\ncpu MHz\t\t: {mhz}\nsiblings\t: {siblings}\ncpu cores\t: {cores}\n"
             f"flags\t\t: fpu sse sse2 {flags}\n")
    return block.format(n=0) + "\n" + block.format(n=1).replace(f"{mhz}", "1000.0")


ZEN4 = _cpuinfo("AuthenticAMD", 25, 17, "avx fma avx2 avx512f avx512bw avx512_bf16", 2596.128)
SAPPHIRE = _cpuinfo("GenuineIntel", 6, 143, "avx fma avx2 avx512f avx512_bf16 amx_bf16 amx_tile", 2000.0)
SAPPHIRE_NO_AMX = SAPPHIRE.replace(" amx_bf16 amx_tile", "")
AVX2 = _cpuinfo("GenuineIntel", 6, 85, "avx fma avx2", 3000.0)


def test_zen4_peak_from_its_cpuinfo() -> None:
    """The issue's example: 2 cores x 64 bf16 FLOP/cycle x 2.6 GHz, and half that in float32."""
    bf16 = cpu_peak("bfloat16", cpuinfo=ZEN4, cpus=2, max_khz=None)
    assert bf16.gflops == pytest.approx(2 * 64 * 2.596128)
    assert bf16.how == ("peak 332 GFLOP/s bf16 = 2 cores x 64 FLOP/cycle x 2.6 GHz "
                        "(AMD Zen 4: AVX-512 BF16 VDPBF16PS; clock from /proc/cpuinfo)")
    fp32 = cpu_peak("float32", cpuinfo=ZEN4, cpus=2, max_khz=None)
    assert (fp32.flop_per_cycle, fp32.gflops) == (32, pytest.approx(2 * 32 * 2.596128))
    # cpufreq's maximum clock wins over the first processor's "cpu MHz" when the kernel has it.
    assert cpu_peak("bf16", cpuinfo=ZEN4, cpus=2, max_khz=3_700_000).gflops == pytest.approx(2 * 64 * 3.7)
    # In a VM, "cpu MHz" is the time-stamp counter's rate, not the cores' clock: the line says so.
    guest = cpu_peak("bf16", cpuinfo=ZEN4.replace("flags\t\t: fpu", "flags\t\t: fpu hypervisor"), cpus=2, max_khz=None)
    assert guest.gflops == bf16.gflops and "time-stamp counter rate" in guest.how and "ratio read high" in guest.how
    assert "time-stamp" not in cpu_peak("bf16", cpuinfo=ZEN4.replace("flags\t\t: fpu", "flags\t\t: fpu hypervisor"),
                                        cpus=2, max_khz=3_700_000).how  # cpufreq's clock is the cores' own
    # Fewer threads than CPUs: only the cores the threads use count.
    assert cpu_peak("bf16", threads=1, cpuinfo=ZEN4, cpus=2, max_khz=None).cores == 1


def test_intel_bf16_peak_depends_on_amx() -> None:
    with_amx = cpu_peak("bf16", cpuinfo=SAPPHIRE, cpus=4, max_khz=None)
    without = cpu_peak("bf16", cpuinfo=SAPPHIRE_NO_AMX, cpus=4, max_khz=None)
    fp32 = cpu_peak("fp32", cpuinfo=SAPPHIRE, cpus=4, max_khz=None)
    # siblings 2 = cpu cores 2: no SMT in these texts, so 4 CPUs are 4 cores.
    assert (with_amx.flop_per_cycle, without.flop_per_cycle, fp32.flop_per_cycle) == (1024, 64, 64)
    assert with_amx.gflops == pytest.approx(4 * 1024 * 2.0) and "AMX" in with_amx.how
    assert without.gflops == fp32.gflops == pytest.approx(4 * 64 * 2.0)


def test_avx2_peak_and_smt_siblings_share_a_core() -> None:
    smt = _cpuinfo("GenuineIntel", 6, 85, "avx fma avx2", 3000.0, siblings=4, cores=2)
    assert parse_cpuinfo(smt).threads_per_core == 2
    peak = cpu_peak("float32", cpuinfo=smt, cpus=4, max_khz=None)
    assert (peak.cores, peak.flop_per_cycle, peak.gflops) == (2, 32, pytest.approx(2 * 32 * 3.0))
    assert "2 threads per core" in peak.how
    assert cpu_peak("float32", cpuinfo=AVX2, cpus=3, max_khz=None).gflops == pytest.approx(3 * 32 * 3.0)


def test_unknown_cpu_says_so_instead_of_a_peak() -> None:
    arm = "processor\t: 0\nFeatures\t: fp asimd sve\nCPU implementer\t: 0x41\n"
    peak = cpu_peak("float32", cpuinfo=arm, cpus=8, max_khz=None)
    assert peak.gflops is None and peak.ratio(100.0) is None and "peak unknown" in peak.how
    assert "peak unknown" in achieved_line("ours", 1e9, 1.0, peak)


def test_one_convolution_counts_two_flop_per_multiply_add() -> None:
    """A 3x3x3 convolution, 2 -> 4 channels, padded, on 8^3 voxels: 2 x (2 x 27) x 4 x 512 FLOP."""
    conv = torch.nn.Conv3d(2, 4, 3, padding=1, bias=False)
    assert forward_flops(conv, (1, 2, 8, 8, 8)) == 2 * (2 * 27) * 4 * 8**3
    assert forward_flops(conv, (3, 2, 8, 8, 8)) == 3 * 2 * (2 * 27) * 4 * 8**3  # linear in the batch
    x = torch.randn(1, 2, 8, 8, 8)
    # Backward: the weight gradient costs one forward; the input's gradient another, when it is wanted.
    assert count_flops(lambda: conv(x).sum().backward()) == 2 * 2 * (2 * 27) * 4 * 8**3
    x.requires_grad_()
    assert count_flops(lambda: conv(x).sum().backward()) == 3 * 2 * (2 * 27) * 4 * 8**3
    assert conv.weight.grad is not None


def test_unet_flop_scale_with_the_patch_and_the_step_is_three_forwards() -> None:
    net = UNet(spatial_dims=3, in_channels=1, out_channels=3, features=[4, 8, 16], norm="instance",
               deep_supervision=True)
    one = forward_flops(net, (1, 1, 16, 16, 16))
    assert forward_flops(net, (1, 1, 32, 16, 16)) == 2 * one  # FLOP are proportional to the voxels
    assert forward_flops(net, (2, 1, 16, 16, 16)) == 2 * one

    def loss(outputs: list[torch.Tensor] | torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return sum(o.float().mean() for o in (outputs if isinstance(outputs, list) else [outputs]))

    step = training_step_flops(net, loss, (2, 1, 16, 16, 16))
    # Backward costs about two forwards (input and weight gradients; the first layer has no input gradient to
    # compute, and the deep-supervision heads add a little to the training forward).
    assert 2.5 * 2 * one < step < 3.2 * 2 * one
    assert all(p.grad is None and p.device.type == "cpu" for p in net.parameters())  # counted on a copy


def test_achieved_line_gives_the_ratio() -> None:
    peak = cpu_peak("bf16", cpuinfo=ZEN4, cpus=2, max_khz=None)
    line = achieved_line("training", 31.6e9 * 5, 1.0, peak)
    assert line == "training: 158.0 GFLOP/s bf16 achieved of 332 peak: ratio to peak 0.48"


def test_a_training_run_logs_its_gflops_against_the_peak(tiny_config, tmp_path, capsys) -> None:
    """A real (one-epoch) tiny run: its GFLOP/s from its patches/s and the FLOP of its step, the peak for the
    precision it trained in, the ratio, as metrics, a tag and one line."""
    import mlflow

    from pipeline.cli import main
    from pipeline.inference import load_checkpoint

    work = tmp_path / "w"
    assert main(["train", str(tiny_config), "--work-dir", str(work), "--set", "train.epochs=1"]) == 0
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("tests").experiment_id])[0]
    metrics, tags = run.data.metrics, run.data.tags
    kwargs = load_checkpoint(work / "checkpoints" / "fold_0" / "final.pt")["model"]
    assert kwargs["features"] == [8, 16]  # the network that trained: the tiny config's
    step = training_step_flops(UNet(**kwargs), None, (2, 1, 24, 24, 24))
    assert metrics["gflops_per_second"] == pytest.approx(step / 2 * metrics["patches_per_second"] / 1e9, rel=1e-6)
    peak = cpu_peak(tags["train.precision"], torch.get_num_threads())
    assert tags["train.peak"] == peak.how
    if peak.gflops:
        assert metrics["ratio_to_peak"] == pytest.approx(metrics["gflops_per_second"] / peak.gflops, rel=1e-6)
    assert f"training: {metrics['gflops_per_second']:.1f} GFLOP/s" in capsys.readouterr().err
