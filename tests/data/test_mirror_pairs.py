"""Left/right label pairs survive mirroring: the plan finds them on real head-and-neck CT, and
augmentation and test-time mirroring (the engine every prediction path shares) swap them.

The test-time test uses a stand-in network that calls a parotid right or left by the side of the
array it lies on, as a trained network does: flip a scan and its left parotid looks like a right one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.data.mirroring import find_mirror_pairs, flip_permutation, mirror_swaps, named_pairs
from tests.conftest import SHARED_DATA

HN_CT = SHARED_DATA / "hn_ct"
RIGHT, LEFT = 3, 4  # RightParotid, LeftParotid in hn_ct's dataset.json


@pytest.fixture(scope="module")
def hn_ct() -> Path:
    if not (HN_CT / "dataset.json").is_file():
        pytest.skip(f"real head-and-neck CT data not found at {HN_CT} (see ../shared/data/README.md)")
    return HN_CT


@pytest.fixture(scope="module")
def hn_label(hn_ct: Path) -> np.ndarray:
    """One real hn_ct label map, every second voxel (64^3: one 64^3 window covers it)."""
    import nibabel as nib

    entry = json.loads((hn_ct / "dataset.json").read_text())["training"][0]
    return np.asarray(nib.load(hn_ct / entry["label"]).dataobj).astype(np.uint8)[::2, ::2, ::2].copy()


def test_names_give_left_right_pairs() -> None:
    labels = {0: "background", 1: "RightParotid", 2: "LeftParotid", 3: "Brainstem", 4: "Lens", 5: "L",
              6: "left kidney", 7: "right kidney", 8: "Lt_Eye"}
    assert named_pairs(labels) == [(1, 2), (6, 7)]
    assert named_pairs({1: "Parotid_R", 2: "Parotid_L", 3: "Eye_R", 4: "Cochlea_L"}) == [(1, 2)]
    # Two right parotids and one left: which is the mirror of which is not for names to say.
    assert named_pairs({1: "Parotid_R", 2: "Parotid_L", 3: "RightParotid"}) == []


def test_the_plan_finds_the_parotids_on_real_cases(hn_ct: Path, tmp_path: Path) -> None:
    """Preprocessing four real cases puts the parotid pair in plans.json, on array axis 1 (left-right in hn_ct)."""
    from pipeline.config import load_config
    from pipeline.stages import prepare

    meta = json.loads((hn_ct / "dataset.json").read_text())
    meta["training"] = meta["training"][:4]
    meta["numTraining"] = 4
    data = tmp_path / "hn"
    for sub in ("imagesTr", "labelsTr"):
        (data / sub).mkdir(parents=True)
    for entry in meta["training"]:
        for key in ("image", "label"):
            shutil.copy(hn_ct / entry[key], data / entry[key])
    (data / "dataset.json").write_text(json.dumps(meta))
    config = tmp_path / "hn.yaml"
    config.write_text(yaml.safe_dump({"data": {"dataset": str(data), "num_folds": 2}, "train": {"device": "cpu"}}))
    prepared = prepare(load_config(config), tmp_path / "work")
    pairs = json.loads((prepared.out_dir / "plans.json").read_text())["mirror_pairs"]
    assert [(p["axis"], p["labels"], p["found_by"]) for p in pairs] == [(1, [RIGHT, LEFT], "names and label maps")]
    # The affine holds no direction: the RAS code alone would have said axis 0. The label maps decide,
    # and they find the pair without its names too.
    maps = [case.load()[1][0].numpy() for case in prepared.cases.values()]
    unnamed = {int(k): f"organ {k}" for k in prepared.plan["labels"]}
    found = find_mirror_pairs(unnamed, maps, prepared.plan["target_spacing"], "RAS")
    assert [(p["axis"], p["labels"]) for p in found] == [(1, [RIGHT, LEFT])]


def test_older_plans_have_no_pairs() -> None:
    assert mirror_swaps({"labels": {"0": "bg", "1": "a"}}) == {}
    assert flip_permutation({}, (0, 1, 2), 6) is None
    assert flip_permutation({1: [(3, 4)]}, (0, 1), 6) == [0, 1, 2, 4, 3, 5]
    assert flip_permutation({1: [(3, 4)]}, (0, 2), 6) is None


def test_a_flipped_patch_labels_the_parotids_by_their_new_sides(hn_label: np.ndarray) -> None:
    """Training augmentation on a real label map: after a left-right flip the right parotid is on the right again."""
    from pipeline.config import PipelineConfig
    from pipeline.training.augmentation import FlipSwappingPairs, train_transforms

    label = torch.from_numpy(hn_label)[None].float()
    flip = FlipSwappingPairs(["image", "label"], prob=1.0, spatial_axis=1, pairs=[(RIGHT, LEFT)])
    out = flip({"image": label.clone(), "label": label.clone()})["label"][0].numpy()
    middle = (hn_label.shape[1] - 1) / 2
    for value, side in ((RIGHT, -1), (LEFT, 1)):
        assert np.sign(np.argwhere(hn_label == value)[:, 1].mean() - middle) == side
        assert np.sign(np.argwhere(out == value)[:, 1].mean() - middle) == side
    expected = np.flip(hn_label, 1).copy()
    expected[np.flip(hn_label, 1) == RIGHT], expected[np.flip(hn_label, 1) == LEFT] = LEFT, RIGHT
    assert np.array_equal(out, expected)
    # The training chain flips each axis with the plan's pairs of that axis only.
    cfg = PipelineConfig()
    cfg.train.augment = True
    steps = [t for t in train_transforms(cfg, [32, 32, 32], {1: [(RIGHT, LEFT)]}).transforms
             if isinstance(t, FlipSwappingPairs)]
    assert [(t.flipper.spatial_axis, t.pairs) for t in steps] == [(0, []), (1, [(RIGHT, LEFT)]), (2, [])]


class _SideAwareOneHot(torch.nn.Module):
    """Outputs the one-hot of the label map it is fed, but calls a parotid right or left by its side of the window."""

    spatial_dims = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        labels = x[:, 0].round().long()
        low_side = (torch.arange(x.shape[3]) < x.shape[3] / 2)[None, None, :, None]
        parotid = (labels == RIGHT) | (labels == LEFT)
        labels = torch.where(parotid, torch.where(low_side, RIGHT, LEFT), labels)
        return 10.0 * torch.nn.functional.one_hot(labels, 6).permute(0, 4, 1, 2, 3).float()


def _predict(plan: dict, label: np.ndarray, folder: Path) -> np.ndarray:
    """The label map ``predict`` gives with mirroring (the Predictor: evaluate, pacs and the pyfunc use it too)."""
    import nibabel as nib

    from pipeline.inference import InferenceSettings, LoadedModel, Predictor
    from pipeline.inference.settings import Overrides

    scan = folder / "scan.nii.gz"
    if not scan.is_file():  # the label map itself is the "scan" the stand-in network reads
        nib.save(nib.Nifti1Image(label.astype(np.float32), np.diag([*plan["target_spacing"], 1.0])), scan)
    model = LoadedModel(_SideAwareOneHot(), plan, list(label.shape), InferenceSettings(mirror=True, precision="float32"),
                        {})
    labels, _ = Predictor([model], torch.device("cpu"), Overrides(compile="off"))([scan])
    return labels


def test_test_time_mirroring_swaps_the_parotids_back(hn_label: np.ndarray, tmp_path: Path) -> None:
    labels = {0: "background", 1: "Brainstem", 2: "SpinalCord", 3: "RightParotid", 4: "LeftParotid", 5: "Mandible"}
    plan = {"orientation": "RAS", "target_spacing": [7.8, 7.8, 5.0], "normalization": ["none"], "ct_stats": [None],
            "modalities": {"0": "CT"}, "labels": {str(k): v for k, v in labels.items()},
            "mirror_pairs": find_mirror_pairs(labels, [hn_label], [7.8, 7.8, 5.0], "RAS")}
    assert mirror_swaps(plan) == {1: [(RIGHT, LEFT)]}
    assert np.array_equal(_predict(plan, hn_label, tmp_path), hn_label)
    # Without the pairs (an older plan) the four left-right-flipped passes call the left parotid right.
    crossed = _predict({k: v for k, v in plan.items() if k != "mirror_pairs"}, hn_label, tmp_path)
    assert not np.any(crossed == LEFT)


def test_two_parts_of_one_organ_are_no_pair(hippocampus: Path) -> None:
    """Anterior and posterior hippocampus lie side by side along one axis, and must never be swapped by a flip."""
    import nibabel as nib

    entries = json.loads((hippocampus / "dataset.json").read_text())["training"]
    maps = [np.asarray(nib.load(hippocampus / entries[i]["label"]).dataobj).astype(np.uint8)
            for i in np.linspace(0, len(entries) - 1, 8).astype(int)]
    unnamed = {0: "background", 1: "part one", 2: "part two"}
    assert find_mirror_pairs(unnamed, maps, [1.0, 1.0, 1.0], "RAS") == []


def test_a_saved_model_carries_its_pairs_to_every_prediction_path(tiny_checkpoint: Path) -> None:
    """The plan travels in the checkpoint (and so in a registered model and the pyfunc): the Predictor mirrors by it."""
    from pipeline.inference import Predictor, load_checkpoint, load_models, save_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint)
    ckpt["plan"]["mirror_pairs"] = [{"axis": 0, "labels": [1, 2], "names": ["a", "b"], "found_by": "label maps"}]
    path = tiny_checkpoint.with_name("paired.pt")
    save_checkpoint({k: v for k, v in ckpt.items() if k != "format"}, path)
    assert [e.label_swaps for e in Predictor(load_models(path, torch.device("cpu")), torch.device("cpu")).engines] == [
        {0: [(1, 2)]}]
    older = Predictor(load_models(tiny_checkpoint, torch.device("cpu")), torch.device("cpu"))
    assert older.engines[0].label_swaps == {}
