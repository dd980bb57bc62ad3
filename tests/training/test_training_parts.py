"""Training pieces: augmentation output, deep-supervision loss, fold ensembles, planning."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from pipeline.config import load_config
from pipeline.data.planning import plan_network
from pipeline.evaluation.metrics import dice_per_label
from pipeline.training.augmentation import train_transforms
from pipeline.training.loss import DeepSupervisionLoss
from pipeline.training.patches import PatchStream, patch_loader


def _cfg(tmp_path: Path, spatial_dims: int, **train: object):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"synthetic_cases": 4}, "model": {"spatial_dims": spatial_dims},
                                    "train": {"elastic": True, **train}}))
    return load_config(path)


@pytest.mark.parametrize(("spatial_dims", "patch"), [(3, [24, 20, 16]), (2, [24, 20])])
def test_augmented_patches_have_patch_size_and_valid_labels(tmp_path: Path, spatial_dims: int, patch: list) -> None:
    cfg = _cfg(tmp_path, spatial_dims)
    tf = train_transforms(cfg, patch)
    tf.set_random_state(seed=3)
    label = torch.zeros(1, 40, 36, 30)
    label[0, 10:25, 8:20, 5:20] = 1
    label[0, 25:30, 20:30, 10:25] = 2
    image = torch.randn(1, 40, 36, 30) + label
    seen_fg = 0
    for _ in range(8):
        out = tf({"image": image.clone(), "label": label.clone()})[0]
        expected = (*patch, 1) if spatial_dims == 2 else tuple(patch)
        assert tuple(out["image"].shape[1:]) == expected and tuple(out["label"].shape[1:]) == expected
        assert set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0, 2.0}
        seen_fg += int((out["label"] > 0).any())
    assert seen_fg >= 2  # foreground oversampling finds the labels


def _batches(stream: PatchStream, first: int, last: int, workers: int) -> list[torch.Tensor]:
    return [torch.cat([img.flatten(), lab.flatten()]) for img, lab in patch_loader(stream, first, last, 2, workers, False)]


def test_patch_stream_is_the_same_with_workers_and_from_a_resumed_epoch(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, 3)
    gen = torch.Generator().manual_seed(0)
    cases = []
    for _ in range(3):
        label = (torch.rand(1, 30, 28, 26, generator=gen) > 0.7).float()
        cases.append({"image": torch.randn(1, 30, 28, 26, generator=gen) + label, "label": label})
    stream = PatchStream(cases, train_transforms(cfg, [16, 16, 16]), seed=5, rank=0, per_epoch=6)
    in_process = _batches(stream, 0, 3, workers=0)
    assert len(in_process) == 9
    # Two worker processes, prefetching across epoch ends, give the same patches (up to float
    # rounding: workers run one thread, so interpolation sums in another order).
    with_workers = _batches(stream, 0, 3, workers=2)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(in_process, with_workers, strict=True))
    # A loader started at epoch 1 (a resumed run) repeats the uninterrupted run's epochs 1-2.
    resumed = _batches(stream, 1, 3, workers=0)
    assert all(torch.equal(a, b) for a, b in zip(in_process[3:], resumed, strict=True))
    # Epochs and patches differ from one another (the stream is not one patch repeated).
    assert not torch.equal(in_process[0], in_process[3]) and not torch.equal(in_process[0], in_process[1])
    other_rank = PatchStream(cases, train_transforms(cfg, [16, 16, 16]), seed=5, rank=1, per_epoch=6)
    assert not torch.equal(_batches(other_rank, 0, 1, workers=0)[0], in_process[0])


def test_deep_supervision_loss_weights_and_downsamples() -> None:
    base = torch.nn.functional.mse_loss
    loss = DeepSupervisionLoss(lambda out, target: base(out, target.float().expand_as(out)))
    label = torch.ones(1, 1, 8, 8, 8)
    outs = [torch.ones(1, 2, 8, 8, 8), torch.zeros(1, 2, 4, 4, 4)]
    # Full resolution is perfect (loss 0), the half-resolution output is off by 1 with weight 0.5.
    assert float(loss(outs, label)) == pytest.approx(0.5 / 1.5)


def test_dice_per_label() -> None:
    pred = np.array([0, 1, 1, 2, 2, 0])
    truth = np.array([0, 1, 0, 2, 2, 2])
    d = dice_per_label(pred, truth, [1, 2, 3])
    assert d[1] == pytest.approx(2 / 3) and d[2] == pytest.approx(0.8) and np.isnan(d[3])


def test_planning_covers_the_median_case_on_the_pooling_grid() -> None:
    fp = {"shapes": [[36, 50, 35], [40, 46, 31], [33, 55, 40]], "spacings": [[1.0, 1.0, 1.0]] * 3}
    plan = plan_network(fp, [1.0, 1.0, 1.0], 3, "cpu")
    grid = 2 ** (len(plan["features"]) - 1)
    # On a CPU the patch is the median rounded down to the grid (no padding to pay for)...
    assert all(p % grid == 0 and m - grid < p <= m for p, m in zip(plan["patch_size"], plan["median_shape"]))
    assert plan["features"][0] == 16 and plan["batch_size"] == 2
    # Resampling to 2 mm halves the shapes; the patch follows.
    coarse = plan_network(fp, [2.0, 2.0, 2.0], 3, "cpu")
    assert max(coarse["patch_size"]) < max(plan["patch_size"])
    gpu = plan_network(fp, [1.0, 1.0, 1.0], 3, "cuda", 80.0)
    assert gpu["features"][0] == 32 and gpu["batch_size"] >= 2
    # ...on a GPU rounded up, as nnU-Net does, so one patch holds the median case.
    assert gpu["patch_size"] == [40, 56, 40]
    assert all(p % grid == 0 and p >= m for p, m in zip(gpu["patch_size"], gpu["median_shape"]))


def test_fold_ensemble_from_a_checkpoints_folder(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from models.unet import UNet
    from pipeline.cli import main
    from pipeline.data.demo import make_demo_dataset
    from pipeline.inference.checkpoints import load_checkpoint, save_checkpoint

    data = make_demo_dataset(tmp_path / "d", 2, [32, 32, 32])
    image = data.parent / "imagesTr" / "demo_000.nii.gz"
    ckpt = load_checkpoint(tiny_checkpoint)
    folder = tmp_path / "checkpoints"
    for fold, seed in ((0, 1), (1, 2)):
        torch.manual_seed(seed)
        save_checkpoint({**ckpt, "state_dict": UNet(**ckpt["model"]).state_dict()}, folder / f"fold_{fold}" / "final.pt")
    masks = {}
    for name, refs in {"a": [folder / "fold_0" / "final.pt"], "b": [folder / "fold_1" / "final.pt"],
                       "ab": [folder]}.items():
        args = [a for r in refs for a in ("--model", str(r))]
        assert main(["predict", *args, str(image), "--out", str(tmp_path / name)]) == 0
        masks[name] = np.asarray(nib.load(tmp_path / name / "demo_000.nii.gz").dataobj)
    assert masks["ab"].shape == masks["a"].shape
    assert not np.array_equal(masks["a"], masks["b"])  # two different networks
    # The ensemble is not simply one of its members.
    assert not np.array_equal(masks["ab"], masks["a"]) or not np.array_equal(masks["ab"], masks["b"])


def test_ensemble_refuses_models_with_different_plans(tmp_path: Path, tiny_checkpoint: Path, hippocampus: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    from pipeline.cli import main
    from pipeline.inference.checkpoints import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint)
    other = tmp_path / "other.pt"
    save_checkpoint({**ckpt, "plan": {**ckpt["plan"], "target_spacing": [2.0, 2.0, 2.0]}}, other)
    image = sorted((hippocampus / "imagesTr").glob("*.nii.gz"))[0]
    out = tmp_path / "o"
    code = main(["predict", "--model", str(tiny_checkpoint), "--model", str(other), str(image), "--out", str(out)])
    assert code == 2 and "preprocessing plan differs" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", "--model", str(empty), str(image), "--out", str(out)]) == 2
    assert "holds no fold_*/final.pt" in capsys.readouterr().err
    assert not out.exists()
