"""Datasets whose labels are DICOM objects: a folder of DICOM files (any nesting) or a DICOMweb server.

A case is one label object (SEG or RTSTRUCT) with the image series it references. For each image
series the label used is the newest human one (every segment or ROI of a configured class MANUAL or
SEMIAUTOMATIC: SEG's SegmentAlgorithmType, RTSTRUCT's ROIGenerationAlgorithm), by structure set or
content (else series) date and time. AUTOMATIC labels, this project's own predictions and an
auto-contouring system's structures among them, are set aside unless ``data.allow_automatic_labels``,
or unless a ``data.reader_edit_rules`` rule recognises the object as a reader's edit saved by a viewer
that keeps AUTOMATIC (docs/data.md). So a reader's correction, stored as a new SEG or RTSTRUCT,
replaces the prediction it corrects. A label that cannot be used is skipped with its reason and the
next newest human label of that series is tried.

Cases are converted to NIfTI on each image's own grid and cached by content (the SOP Instance UIDs
of the label and of the image's instances: DICOM gives changed content a new UID), so a second call
with nothing new converts nothing. :func:`export_dicom_dataset` writes the nnU-Net v2 / MSD layout
with a ``manifest.json``; ``run`` trains from the same export in its work directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.dicom_index import Instance
from pipeline.data.dicom_labels import (
    HUMAN,
    ClassMatcher,
    LabelHeader,
    LabelProblem,
    read_label_header,
    rtstruct_label,
    seg_label,
)
from pipeline.data.files import atomic_file, write_text_atomic
from pipeline.errors import InputDataError, PipelineError

CONVERTER_VERSION = 1
_MODALITY_NAMES = {"MR": "MRI", "CT": "CT", "PT": "PET"}


def is_dicom_source(spec: str) -> bool:
    """Whether ``data.dataset`` names a DICOM source: a DICOMweb URL, or a folder without dataset.json or imagesTr.

    Args:
        spec: the ``data.dataset`` value.
    """
    if spec.startswith(("http://", "https://")):
        return True
    p = Path(spec)
    return p.is_dir() and not (p / "dataset.json").is_file() and not any(
        (p / a).is_dir() and (p / b).is_dir() for a, b in (("imagesTr", "labelsTr"), ("images", "labels")))


@dataclass
class DicomCase:
    """A usable case: a label object and the image series it references, converted.

    Args:
        case: its name in ``imagesTr``/``labelsTr`` (from the image series' UID, never a patient field).
        series_uid: the image series.
        study_uid: its study.
        label: the label object used.
        modalities: each channel's Modality.
        reader_correction: a human label of a series that also holds an older AUTOMATIC label.
        images: the converted image channels (NIfTI, in the cache), the labelled series first.
        label_map: the converted label map (NIfTI, in the cache).
        algorithm_type: the least human type of its segments or ROIs of a configured class.
        edit_rule: the ``data.reader_edit_rules`` rule (1-based) that recognised it as a reader's edit, or ``None``.
    """

    case: str
    series_uid: str
    study_uid: str
    label: LabelHeader
    modalities: list[str]
    reader_correction: bool
    images: list[Path]
    label_map: Path
    algorithm_type: str = ""
    edit_rule: int | None = None

    def manifest(self) -> dict[str, Any]:
        """Its row of ``manifest.json``."""
        return {"case": self.case, "series_instance_uid": self.series_uid, "study_instance_uid": self.study_uid,
                "label_sop_instance_uid": self.label.sop_uid, "label_type": self.label.kind,
                "algorithm_type": self.algorithm_type or self.label.algorithm_type,
                "reader_edit_rule": self.edit_rule, "reader_correction": self.reader_correction}


@dataclass
class DicomScan:
    """What a DICOM source holds for training.

    Args:
        cases: the usable cases, by case name.
        skipped: labels that cannot be used: ``{"label_sop_instance_uid", "reason"}``.
        not_used: usable labels that are not training labels: ``{"label_sop_instance_uid", "reason", "why"}``,
            ``why`` ``automatic`` (set aside as a model's or auto-contouring system's output) or ``superseded``
            (a newer human label of the series is used).
        classes: the configured class names, in label order.
    """

    cases: list[DicomCase] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    not_used: list[dict[str, str]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)

    @property
    def automatic(self) -> int:
        """How many labels were set aside for being AUTOMATIC."""
        return sum(row.get("why") == "automatic" for row in self.not_used)

    def automatic_note(self) -> str:
        """How many labels were set aside for being AUTOMATIC, and how to accept them knowingly (one line)."""
        return (f"{self.automatic} label(s) set aside as AUTOMATIC (a model's or an auto-contouring system's output). "
                "To train on them knowingly: data.allow_automatic_labels: true; to recognise readers' edits that a "
                "viewer saved as AUTOMATIC: data.reader_edit_rules (docs/data.md, 'Human or machine').")

    def manifest(self) -> dict[str, Any]:
        """``{"cases": [...], "skipped": [...]}``, as ``manifest.json`` holds it."""
        return {"cases": [c.manifest() for c in self.cases], "skipped": list(self.skipped)}

    def digest(self) -> str:
        """The label set's digest: which label object is used for which image series."""
        return label_summary(self.manifest(), "")["digest"]


def label_summary(manifest: dict[str, Any], source: str) -> dict[str, Any]:
    """What made a DICOM dataset, for the run's input and the version's description: counts, source, digest.

    Args:
        manifest: ``manifest.json``'s content.
        source: where the labels came from, without credentials (a URL, or "a DICOM folder").
    """
    cases = manifest.get("cases", [])
    pairs = sorted((c["series_instance_uid"], c["label_sop_instance_uid"]) for c in cases)
    return {"source": source, "cases": len(cases),
            "seg": sum(c["label_type"] == "SEG" for c in cases),
            "rtstruct": sum(c["label_type"] == "RTSTRUCT" for c in cases),
            "reader_corrections": sum(bool(c.get("reader_correction")) for c in cases),
            "skipped": len(manifest.get("skipped", [])),
            "digest": hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16]}


def case_name(series_uid: str) -> str:
    """The case's file name stem: stable per image series, and no patient field in it.

    Args:
        series_uid: the image series' SeriesInstanceUID.
    """
    return "case_" + hashlib.sha256(series_uid.encode()).hexdigest()[:12]


def _write_image(image: Any, path: Path) -> None:
    """A SimpleITK image as compressed NIfTI, written atomically (a killed conversion leaves no half file)."""
    import SimpleITK as sitk

    with atomic_file(path, ".nii.gz") as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)


class _Converter:
    """Converts images and labels into the cache, each once per content."""

    def __init__(self, cache: Path, matcher: ClassMatcher, series: dict[str, list[Instance]],
                 channels: tuple[str, ...] = ()) -> None:
        self.cache, self.matcher, self.series, self.channels = cache, matcher, series, channels
        self.converted = 0

    def _series_folder(self, series_uid: str) -> Path:
        # The reader reads one folder: give it one of links to this series' files, wherever they lie.
        folder = self.cache / "series" / hashlib.sha256(series_uid.encode()).hexdigest()[:16]
        if folder.is_dir():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for n, inst in enumerate(self.series[series_uid]):
            (folder / f"{n:05d}.dcm").symlink_to(inst.path.resolve())
        return folder

    def _key(self, *parts: Any) -> str:
        return hashlib.sha256(json.dumps([CONVERTER_VERSION, *parts]).encode()).hexdigest()[:24]

    def _image_path(self, series_uid: str) -> Path:
        sops = sorted(i.sop_uid for i in self.series[series_uid])
        return self.cache / "images" / f"{self._key(series_uid, sops)}.nii.gz"

    def _image(self, series_uid: str):

        from transforms.dicom import read_dicom_series

        path = self._image_path(series_uid)
        try:
            image = read_dicom_series(self._series_folder(series_uid), series_uid)
        except InputDataError as exc:
            raise LabelProblem(f"its image series {series_uid} cannot be read ({exc.problem})") from None
        if not path.is_file():
            _write_image(image, path)
            self.converted += 1
        return image, path

    def _channel_series(self, header: LabelHeader, number: int, pattern: str) -> str:
        study = self.series[header.series_uid][0].study_uid
        found = sorted(uid for uid, insts in self.series.items() if uid != header.series_uid
                       and insts[0].study_uid == study and re.search(pattern, insts[0].description, re.IGNORECASE))
        if len(found) != 1:
            raise LabelProblem(f"channel {number} (data.channel_series {pattern!r}): "
                               f"{'no' if not found else len(found)} series of study {study} match")
        return found[0]

    def channel_images(self, header: LabelHeader, reference: Path) -> list[tuple[Path, str]]:
        """The other channels of a multi-channel task, found in the labelled series' study, on its grid.

        A channel on another grid is resampled onto the labelled series' one (linear), as nnU-Net needs
        every channel of a case on one grid.

        Args:
            header: the label object (its series is channel 0).
            reference: channel 0's converted image.

        Returns:
            Each further channel's converted image and Modality.
        """
        import SimpleITK as sitk

        from transforms.dicom import read_dicom_series

        paths = []
        for number, pattern in enumerate(self.channels, start=1):
            uid = self._channel_series(header, number, pattern)
            sops = sorted(i.sop_uid for i in self.series[uid])
            path = self.cache / "channels" / f"{self._key(reference.name, uid, sops)}.nii.gz"
            if not path.is_file():
                try:
                    image = read_dicom_series(self._series_folder(uid), uid)
                except InputDataError as exc:
                    raise LabelProblem(f"channel {number}: series {uid} cannot be read ({exc.problem})") from None
                ref = sitk.ReadImage(str(reference))
                same = (image.GetSize() == ref.GetSize() and np.allclose(image.GetOrigin(), ref.GetOrigin(), atol=1e-3)
                        and np.allclose(image.GetSpacing(), ref.GetSpacing(), rtol=1e-4)
                        and np.allclose(image.GetDirection(), ref.GetDirection(), atol=1e-4))
                if not same:
                    image = sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
                _write_image(image, path)
                self.converted += 1
            paths.append((path, self.series[uid][0].modality))
        return paths

    def convert(self, header: LabelHeader) -> tuple[Path, Path]:
        """The image and label NIfTI of a label object and its series (from the cache when converted before).

        Args:
            header: the label object.

        Raises:
            LabelProblem: why it cannot be used (remembered, so a bad label is not read again either).
        """
        import SimpleITK as sitk

        instances = self.series[header.series_uid]
        sops = sorted(i.sop_uid for i in instances)
        key = self._key(header.sop_uid, sops, list(self.matcher.classes), [list(a) for a in self.matcher.aliases])
        done = self.cache / "labels" / key
        if (done / "problem.txt").is_file():
            raise LabelProblem((done / "problem.txt").read_text())
        if (done / "label.nii.gz").is_file() and self._image_path(header.series_uid).is_file():
            return self._image_path(header.series_uid), done / "label.nii.gz"
        image, image_path = self._image(header.series_uid)
        frame_of_reference = instances[0].frame_of_reference_uid
        done.mkdir(parents=True, exist_ok=True)
        try:
            if header.kind == "SEG":
                label = seg_label(header, image, self.matcher, set(sops), frame_of_reference)
            else:
                label = rtstruct_label(header, image, self.matcher, frame_of_reference)
        except LabelProblem as exc:
            write_text_atomic(done / "problem.txt", str(exc))
            raise
        out = sitk.GetImageFromArray(label.astype(np.uint8))
        out.CopyInformation(image)
        _write_image(out, done / "label.nii.gz")
        self.converted += 1
        return image_path, done / "label.nii.gz"


def _headers(instances: list[Instance], skipped: list[dict[str, str]]) -> list[LabelHeader]:
    headers = []
    for inst in instances:
        if inst.modality.upper() not in ("SEG", "RTSTRUCT"):
            continue
        try:
            header = read_label_header(inst.path)
        except LabelProblem as exc:
            skipped.append({"label_sop_instance_uid": inst.sop_uid, "reason": str(exc)})
            continue
        if header is not None:
            headers.append(header)
    return headers


def scan_instances(instances: list[Instance], matcher: ClassMatcher, cache: Path, allow_automatic: bool = False,
                   channels: tuple[str, ...] = (),
                   edit_rules: list[dict[str, str]] | None = None) -> tuple[DicomScan, int]:
    """Choose one label per image series, convert it, and report every label not used and why.

    Args:
        instances: the source's DICOM instances.
        matcher: the configured classes.
        cache: the conversion cache folder.
        allow_automatic: AUTOMATIC SEGs and RTSTRUCTs may be training labels (never by default).
        channels: for a multi-channel task, one regular expression per further channel, searched in the
            SeriesDescription of the labelled series' study (``data.channel_series``).
        edit_rules: ``data.reader_edit_rules``: AUTOMATIC objects they match count as a reader's edits.

    Returns:
        The scan and how many conversions this call made (0: all from the cache).
    """
    scan = DicomScan(classes=list(matcher.classes))
    series: dict[str, list[Instance]] = {}
    for inst in instances:
        if inst.modality.upper() not in ("SEG", "RTSTRUCT", "SR", "PR", "KO"):
            series.setdefault(inst.series_uid, []).append(inst)
    by_series: dict[str, list[LabelHeader]] = {}
    for header in _headers(instances, scan.skipped):
        if header.series_uid not in series:
            scan.skipped.append({"label_sop_instance_uid": header.sop_uid, "reason":
                                 f"{header.kind} {header.sop_uid}: references image series "
                                 f"{header.series_uid or '(none)'}, which is not in the source"})
            continue
        by_series.setdefault(header.series_uid, []).append(header)
    converter = _Converter(cache, matcher, series, channels)
    for series_uid in sorted(by_series):
        labels = sorted(by_series[series_uid], key=lambda h: (h.when, h.sop_uid), reverse=True)
        judged = {h.sop_uid: _judge(h, matcher, edit_rules) for h in labels}
        chosen: DicomCase | None = None
        for header in labels:
            algorithm, rule, human = judged[header.sop_uid]
            if chosen is not None:
                scan.not_used.append({"label_sop_instance_uid": header.sop_uid, "why": "superseded",
                                      "reason": f"superseded by the newer label {chosen.label.sop_uid}"})
                continue
            if not human and not allow_automatic:
                parts = "segment(s)" if header.kind == "SEG" else "ROI(s)"
                scan.not_used.append({"label_sop_instance_uid": header.sop_uid, "why": "automatic",
                                      "reason": f"AUTOMATIC {header.kind} {parts} (a model's or an auto-contouring "
                                                "system's output; data.allow_automatic_labels is off and no "
                                                "data.reader_edit_rules rule matches)"})
                continue
            try:
                image, label = converter.convert(header)
                more = converter.channel_images(header, image)
            except LabelProblem as exc:
                scan.skipped.append({"label_sop_instance_uid": header.sop_uid, "reason": str(exc)})
                continue
            corrects = human and any(not judged[h.sop_uid][2] and h.when <= header.when for h in labels)
            first = series[series_uid][0]
            chosen = DicomCase(case_name(series_uid), series_uid, first.study_uid, header,
                               [first.modality, *(m for _, m in more)], corrects, [image, *(p for p, _ in more)], label,
                               algorithm, rule)
            scan.cases.append(chosen)
    scan.cases.sort(key=lambda c: c.case)
    return scan, converter.converted


#: The Manufacturer this project writes into its SEGs and RTSTRUCTs: such an object is never a reader's edit.
OWN_MANUFACTURER = "unet-pipeline"


def edit_rule(header: LabelHeader, rules: list[dict[str, str]] | None) -> int | None:
    """The first ``data.reader_edit_rules`` rule (1-based) a label object matches, or ``None``.

    A rule matches when each of its attributes has a value its regular expression finds (case-insensitive).
    This project's own outputs (Manufacturer ``unet-pipeline``) never match: they are a model's, whatever
    their series description says. Values are only matched, never shown (ContentCreatorName is a person's name).

    Args:
        header: the label object's header.
        rules: the rules, attribute keyword -> regular expression.
    """
    if OWN_MANUFACTURER in header.attributes.get("Manufacturer", ()):
        return None
    for number, rule in enumerate(rules or [], start=1):
        if rule and all(any(re.search(pattern, value, re.IGNORECASE) for value in header.attributes.get(key, ()))
                        for key, pattern in rule.items()):
            return number
    return None


def _judge(header: LabelHeader, matcher: ClassMatcher,
           edit_rules: list[dict[str, str]] | None) -> tuple[str, int | None, bool]:
    """A label's algorithm type (of its segments/ROIs of a configured class), the edit rule that recognised it
    as a reader's edit (AUTOMATIC objects only), and whether it counts as a reader's label."""
    algorithm = header.algorithm_for(matcher)
    if algorithm in HUMAN:
        return algorithm, None, True
    rule = edit_rule(header, edit_rules)
    return algorithm, rule, rule is not None


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system: copy
        shutil.copyfile(src, dst)


def write_dataset(scan: DicomScan, out: Path, name: str) -> None:
    """Write ``scan`` in the nnU-Net v2 / MSD layout, replacing ``out`` whole (never half-written).

    ``imagesTr/CASE_0000.nii.gz``, ``labelsTr/CASE.nii.gz``, ``dataset.json`` (nnU-Net v2's
    ``channel_names``/``labels``/``numTraining``/``file_ending`` and MSD's ``training`` list) and
    ``manifest.json``.

    Args:
        scan: the scanned source.
        out: the output folder.
        name: the dataset's name.
    """
    if not scan.cases:
        raise PipelineError("the DICOM source holds no usable case" + (
            f" ({len(scan.skipped)} label(s) skipped; `unet-pipeline dataset check` lists why)" if scan.skipped else ""))
    if out.exists() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise InputDataError(out, "exists and is not an earlier export (no manifest.json): choose an empty folder")
    staging = out.with_name(f".{out.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "imagesTr").mkdir(parents=True)
    (staging / "labelsTr").mkdir()
    for case in scan.cases:
        for channel, image in enumerate(case.images):
            _link(image, staging / "imagesTr" / f"{case.case}_{channel:04d}.nii.gz")
        _link(case.label_map, staging / "labelsTr" / f"{case.case}.nii.gz")
    channel_names = {str(c): _MODALITY_NAMES.get(m.upper(), m or "MRI") for c, m in enumerate(scan.cases[0].modalities)}
    meta = {"name": name, "channel_names": channel_names,
            "labels": {"background": 0, **{n: v for v, n in enumerate(scan.classes, start=1)}},
            "numTraining": len(scan.cases), "file_ending": ".nii.gz",
            "training": [{"image": f"./imagesTr/{c.case}.nii.gz", "label": f"./labelsTr/{c.case}.nii.gz"}
                         for c in scan.cases]}
    (staging / "dataset.json").write_text(json.dumps(meta, indent=1))
    (staging / "manifest.json").write_text(json.dumps(scan.manifest(), indent=1))
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)
