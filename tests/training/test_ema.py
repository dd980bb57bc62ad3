"""The weight average (``train.ema_decay``): its arithmetic, that it is what gets validated and exported, exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.inference import load_checkpoint
from pipeline.training import ema as ema_module
from pipeline.training import loop
from pipeline.training.ema import WeightAverage

DECAY = 0.6


def test_the_average_follows_decay_times_past_plus_the_rest_times_now() -> None:
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2))
    average = WeightAverage(net, DECAY)
    expected = None
    for step in range(4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(float(step + 1))
            net[1].running_mean.add_(1.0)  # buffers are averaged too
        average.update(net)
        now = {k: v.clone() for k, v in net.state_dict().items() if v.is_floating_point()}
        expected = now if expected is None else {k: DECAY * expected[k] + (1 - DECAY) * now[k] for k in now}
    got = average.module.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(net, 1.0)


def test_config_rejects_a_decay_outside_zero_one(tiny_config: Path) -> None:
    with pytest.raises(ConfigError, match="train.ema_decay"):
        load_config(tiny_config, ["train.ema_decay=1.5"])


def _train(cfg, prepared, folder: Path):
    from pipeline.training import train

    return train(cfg, prepared.plan, prepared.subset("train"), prepared.subset("val"), folder)


@pytest.fixture(scope="module")
def prepared_tiny(tmp_path_factory: pytest.TempPathFactory):
    import yaml

    from pipeline.stages import prepare
    from tests.conftest import TINY

    root = tmp_path_factory.mktemp("ema")
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    cfg = load_config(root / "tiny.yaml", ["train.epochs=4", "train.iterations_per_epoch=3", "train.val_every=2",
                                           f"train.ema_decay={DECAY}"])
    return cfg, prepare(cfg, root / "w"), root


def test_validation_and_export_use_the_average_of_every_step(prepared_tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, prepared, root = prepared_tiny
    steps: list[dict[str, torch.Tensor]] = []
    real_update = ema_module.WeightAverage.update

    def recording(self: WeightAverage, network: torch.nn.Module) -> None:
        steps.append({k: v.detach().clone() for k, v in network.state_dict().items()})
        real_update(self, network)

    monkeypatch.setattr(ema_module.WeightAverage, "update", recording)
    result = _train(cfg, prepared, root / "a")
    assert len(steps) == 4 * 3  # after every optimiser step
    expected = dict(steps[0])
    for now in steps[1:]:
        expected = {k: DECAY * expected[k] + (1 - DECAY) * now[k] for k in now}
    final = load_checkpoint(result.final_checkpoint)["state_dict"]
    raw = load_checkpoint(result.last_checkpoint)["state_dict"]
    for k, v in expected.items():
        torch.testing.assert_close(final[k], v, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(final[k], raw[k]) for k in final)  # exported != the raw last step
    best = load_checkpoint(result.best_checkpoint)
    assert best["epoch"] in (2, 4)


def test_a_resumed_run_continues_the_same_average(prepared_tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, prepared, root = prepared_tiny
    straight = load_checkpoint(_train(cfg, prepared, root / "straight").final_checkpoint)["state_dict"]

    real_end = loop._end_epoch

    def stop_after_two(run, state, epoch, metrics, progress):
        real_end(run, state, epoch, metrics, progress)
        if epoch + 1 == 2:
            raise KeyboardInterrupt  # as if killed right after epoch 2's last.pt

    monkeypatch.setattr(loop, "_end_epoch", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        _train(cfg, prepared, root / "resumed")
    monkeypatch.setattr(loop, "_end_epoch", real_end)
    from pipeline.training import train

    result = train(cfg, prepared.plan, prepared.subset("train"), prepared.subset("val"), root / "resumed", resume=True)
    resumed = load_checkpoint(result.final_checkpoint)["state_dict"]
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=0)
