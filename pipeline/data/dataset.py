"""Dataset discovery: an MSD/nnU-Net ``dataset.json`` or a plain folder of image/label pairs."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import InputDataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass
class Case:
    """One case: its image channels (one path each) and, for training data, its label.

    Args:
        case_id: unique name, derived from the file name.
        images: one path per input channel (a NIfTI file or a DICOM folder).
        label: the label map, or ``None`` for unlabelled cases.
    """

    case_id: str
    images: list[Path]
    label: Path | None = None


@dataclass
class Dataset:
    """A discovered dataset.

    Args:
        root: the folder holding ``dataset.json`` (or the plain folder).
        name: dataset name.
        modalities: channel index -> modality name (``"MRI"``, ``"CT"``...).
        labels: label value -> name, background (0) included.
        cases: the labelled training cases.
    """

    root: Path
    name: str
    modalities: dict[int, str]
    labels: dict[int, str]
    cases: list[Case] = field(default_factory=list)

    @property
    def foreground_labels(self) -> dict[int, str]:
        """Labels without the background."""
        return {k: v for k, v in self.labels.items() if k != 0}


def strip_nifti_suffix(name: str) -> str:
    """``case_0001.nii.gz`` -> ``case_0001``.

    Args:
        name: a file name.
    """
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _inside(root: Path, rel: Any, json_path: Path, what: str) -> Path:
    """Resolve a path from ``dataset.json`` and refuse any that leaves the dataset folder."""
    if not isinstance(rel, str) or not rel:
        raise InputDataError(json_path, f"{what} entry {rel!r} is not a relative path string")
    if Path(rel).is_absolute():
        raise InputDataError(json_path, f"{what} path '{rel}' is absolute; paths must be relative to the dataset folder")
    resolved = (root / rel).resolve()
    if not resolved.is_relative_to(root.resolve()):
        # A subset built by linking files is the common way here; say what to do instead.
        if (root / rel).is_symlink():
            raise InputDataError(json_path, f"{what} path '{rel}' is a symbolic link that escapes the dataset "
                                            f"folder {root}; copy (or hard-link) the file into the folder instead")
        raise InputDataError(json_path, f"{what} path '{rel}' escapes the dataset folder {root}")
    return resolved


def _nnunet_channel_files(root: Path, rel: str, n_channels: int, json_path: Path) -> list[Path]:
    """MSD lists ``imagesTr/x.nii.gz``; nnU-Net v2 stores ``x_0000.nii.gz``, ``x_0001.nii.gz``..."""
    base = _inside(root, rel, json_path, "image")
    if base.exists():
        return [base]
    stem = strip_nifti_suffix(base.name)
    suffix = base.name[len(stem):] or ".nii.gz"
    channels = [base.with_name(f"{stem}_{c:04d}{suffix}") for c in range(n_channels)]
    if all(p.exists() for p in channels):
        return channels
    raise InputDataError(base, "image listed in dataset.json does not exist")


def load_dataset(path: str | Path) -> Dataset:
    """Discover a dataset from a ``dataset.json`` or a folder.

    A folder with ``dataset.json`` is read as MSD/nnU-Net; otherwise it must hold
    ``imagesTr/`` and ``labelsTr/`` (or ``images/`` and ``labels/``) with matching
    file names (nnU-Net's ``_0000`` channel suffixes allowed).

    Args:
        path: a ``dataset.json`` file or a folder.
    """
    p = Path(path)
    if p.is_dir() and (p / "dataset.json").is_file():
        p = p / "dataset.json"
    if p.is_file():
        return _load_dataset_json(p)
    if p.is_dir():
        return _load_plain_folder(p)
    raise InputDataError(p, "dataset not found (expected a dataset.json or a folder holding one)")


def read_case_list(path: str | Path) -> list[str]:
    """Case ids from a text file: one per line; blank lines and ``#`` comments are ignored.

    Args:
        path: the file.
    """
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputDataError(p, f"case list not readable ({exc.__class__.__name__})") from None
    ids = [line.split("#", 1)[0].strip() for line in lines]
    return [i for i in ids if i]


def select_cases(dataset: Dataset, case_list: str | Path, keep: bool) -> Dataset:
    """The dataset with only (``keep``) or without the cases listed in ``case_list``.

    A held-out test split is the use: its cases are taken out of everything a run reads (fingerprint,
    plan, folds, training, validation, calibration), and ``evaluate --cases`` scores only them.

    Args:
        dataset: the discovered dataset.
        case_list: a file of case ids (:func:`read_case_list`).
        keep: keep only the listed cases (else drop them).

    Raises:
        InputDataError: the list is empty, or names a case the dataset does not have (a list made for
            another dataset must not silently keep out nothing).
    """
    ids = read_case_list(case_list)
    if not ids:
        raise InputDataError(Path(case_list), "case list names no case")
    present = {c.case_id for c in dataset.cases}
    unknown = sorted(set(ids) - present)
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise InputDataError(Path(case_list), f"names case(s) the dataset {dataset.root} does not have: "
                                              f"{', '.join(unknown[:3])}{more}")
    listed = set(ids)
    cases = [c for c in dataset.cases if (c.case_id in listed) == keep]
    return Dataset(dataset.root, dataset.name, dataset.modalities, dataset.labels, cases)


def _load_dataset_json(json_path: Path) -> Dataset:
    root = json_path.parent
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputDataError(json_path, f"not a readable JSON file ({exc.__class__.__name__})") from None
    if not isinstance(meta, dict):
        raise InputDataError(json_path, "must hold a JSON object")
    modality_raw = meta.get("modality") or meta.get("channel_names") or {"0": "MRI"}
    labels_raw = meta.get("labels")
    if not isinstance(labels_raw, dict) or not labels_raw:
        raise InputDataError(json_path, "has no 'labels' mapping")
    try:
        modalities = {int(k): str(v) for k, v in modality_raw.items()}
        # MSD maps value -> name; nnU-Net v2 maps name -> value.
        if all(str(k).lstrip("-").isdigit() for k in labels_raw):
            labels = {int(k): str(v) for k, v in labels_raw.items()}
        else:
            labels = {int(v): str(k) for k, v in labels_raw.items()}
    except (AttributeError, TypeError, ValueError):
        raise InputDataError(json_path, "'modality'/'labels' must map integers to names") from None
    entries = meta.get("training")
    if not isinstance(entries, list) or not entries:
        raise InputDataError(json_path, "has no 'training' list of cases")
    cases = []
    for entry in entries:
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise InputDataError(json_path, f"training entry {entry!r} needs 'image' and 'label'")
        image = entry["image"]
        if isinstance(image, list):
            images = [_inside(root, rel, json_path, "image") for rel in image]
        else:
            images = _nnunet_channel_files(root, image, len(modalities), json_path)
        label = _inside(root, entry["label"], json_path, "label")
        for f in [*images, label]:
            if not f.exists():
                raise InputDataError(f, "listed in dataset.json but does not exist")
        case_id = strip_nifti_suffix(label.name)
        cases.append(Case(case_id, images, label))
    if len(images) != len(modalities):
        raise InputDataError(json_path, f"cases have {len(images)} channel(s) but 'modality' lists {len(modalities)}")
    return Dataset(root, str(meta.get("name", root.name)), modalities, labels, cases)


def _load_plain_folder(folder: Path) -> Dataset:
    for img_dir, lbl_dir in (("imagesTr", "labelsTr"), ("images", "labels")):
        if (folder / img_dir).is_dir() and (folder / lbl_dir).is_dir():
            break
    else:
        raise InputDataError(folder, "holds no dataset.json and no imagesTr/labelsTr (or images/labels) folders")
    by_case: dict[str, list[Path]] = {}
    for f in sorted((folder / img_dir).iterdir()):
        if f.name.endswith(NIFTI_SUFFIXES):
            stem = re.sub(r"_\d{4}$", "", strip_nifti_suffix(f.name))
            by_case.setdefault(stem, []).append(f)
    cases = []
    for case_id, images in by_case.items():
        label = next((folder / lbl_dir / f"{case_id}{s}" for s in NIFTI_SUFFIXES
                      if (folder / lbl_dir / f"{case_id}{s}").exists()), None)
        if label is None:
            raise InputDataError(folder / img_dir / images[0].name, f"has no label file in {folder / lbl_dir}")
        cases.append(Case(case_id, images, label))
    if not cases:
        raise InputDataError(folder / img_dir, "holds no NIfTI images")
    n_channels = {len(c.images) for c in cases}
    if len(n_channels) != 1:
        raise InputDataError(folder / img_dir, f"cases have different channel counts {sorted(n_channels)}")
    return Dataset(folder, folder.name, {c: "MRI" for c in range(n_channels.pop())}, {}, cases)
