"""Dataset discovery on the real MSD hippocampus layout, plain folders and unsafe paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.data.dataset import load_dataset
from pipeline.errors import InputDataError


def test_real_msd_dataset_json(hippocampus: Path) -> None:
    ds = load_dataset(hippocampus)
    meta = json.loads((hippocampus / "dataset.json").read_text())
    assert len(ds.cases) == len(meta["training"]) == meta["numTraining"]
    assert ds.labels == {0: "background", 1: "Anterior", 2: "Posterior"}
    assert ds.modalities == {0: "MRI"}
    first = ds.cases[0]
    assert first.images[0].is_file() and first.label.is_file()
    assert first.case_id == Path(meta["training"][0]["label"]).name.removesuffix(".nii.gz")


def _dataset(tmp_path: Path, hippocampus: Path, training: list[dict], extra: dict | None = None) -> Path:
    root = tmp_path / "ds"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir(parents=True)
    src = sorted((hippocampus / "imagesTr").glob("*.nii.gz"))[0]
    shutil.copy(src, root / "imagesTr" / "a.nii.gz")
    shutil.copy(hippocampus / "labelsTr" / src.name, root / "labelsTr" / "a.nii.gz")
    meta = {"name": "t", "modality": {"0": "MRI"}, "labels": {"0": "bg", "1": "x"}, "training": training, **(extra or {})}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.mark.parametrize("image", ["../outside.nii.gz", "./imagesTr/../../outside.nii.gz", "/etc/passwd"])
def test_paths_escaping_the_dataset_folder_are_refused(tmp_path, hippocampus, image) -> None:
    (tmp_path / "outside.nii.gz").write_bytes(b"x")
    root = _dataset(tmp_path, hippocampus, [{"image": image, "label": "./labelsTr/a.nii.gz"}])
    with pytest.raises(InputDataError) as err:
        load_dataset(root)
    assert str(root / "dataset.json") in str(err.value)
    assert "escapes the dataset folder" in str(err.value) or "is absolute" in str(err.value)


def test_a_symlink_out_of_the_dataset_folder_is_refused_with_what_to_do(tmp_path, hippocampus) -> None:
    root = _dataset(tmp_path, hippocampus, [{"image": "./imagesTr/b.nii.gz", "label": "./labelsTr/a.nii.gz"}])
    (root / "imagesTr" / "b.nii.gz").symlink_to(sorted((hippocampus / "imagesTr").glob("*.nii.gz"))[0])
    with pytest.raises(InputDataError) as err:
        load_dataset(root)
    assert "symbolic link that escapes the dataset folder" in str(err.value)
    assert "copy (or hard-link) the file" in str(err.value)


def test_missing_listed_file(tmp_path: Path, hippocampus: Path) -> None:
    root = _dataset(tmp_path, hippocampus, [{"image": "./imagesTr/zz.nii.gz", "label": "./labelsTr/a.nii.gz"}])
    with pytest.raises(InputDataError, match=r"zz.*does not exist"):
        load_dataset(root)


def test_nnunet_channel_suffixes(tmp_path: Path, hippocampus: Path) -> None:
    root = _dataset(tmp_path, hippocampus, [{"image": "./imagesTr/b.nii.gz", "label": "./labelsTr/a.nii.gz"}],
                    {"modality": {"0": "T1", "1": "T2"}})
    for c in range(2):
        shutil.copy(root / "imagesTr" / "a.nii.gz", root / "imagesTr" / f"b_{c:04d}.nii.gz")
    ds = load_dataset(root / "dataset.json")
    assert [p.name for p in ds.cases[0].images] == ["b_0000.nii.gz", "b_0001.nii.gz"]


def test_plain_folder_of_pairs(tmp_path: Path, hippocampus: Path) -> None:
    root = _dataset(tmp_path, hippocampus, [])
    (root / "dataset.json").unlink()
    ds = load_dataset(root)
    assert [c.case_id for c in ds.cases] == ["a"]


def test_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match="no dataset.json"):
        load_dataset(tmp_path)
    with pytest.raises(InputDataError, match="dataset not found"):
        load_dataset(tmp_path / "nothing")
    bad = tmp_path / "dataset.json"
    bad.write_text("{not json")
    with pytest.raises(InputDataError, match="not a readable JSON"):
        load_dataset(bad)


def test_stored_folds_keep_their_cases_when_cases_come_and_go(tmp_path: Path) -> None:
    from pipeline.data import stored_splits

    path = tmp_path / "splits.json"
    first = stored_splits([f"c{i:02d}" for i in range(20)], 5, 0, path)
    grown = stored_splits([f"c{i:02d}" for i in range(1, 23)], 5, 0, path)  # c00 gone, c20-c22 new
    for before, after in zip(first, grown):
        assert set(before["val"]) - {"c00"} <= set(after["val"])
        assert not set(after["val"]) & set(after["train"])
    assert sorted(c for f in grown for c in f["val"]) == [f"c{i:02d}" for i in range(1, 23)]
    assert max(len(f["val"]) for f in grown) - min(len(f["val"]) for f in grown) <= 1
    assert stored_splits([f"c{i:02d}" for i in range(1, 23)], 5, 0, path) == grown
