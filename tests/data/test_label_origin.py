"""Human or machine: AUTOMATIC labels (an auto-contouring system's RTSTRUCT, a model's SEG) are set aside, and a
reader's edit that a viewer saved as AUTOMATIC is recognised by a configured rule, through ``dataset check`` and
``dataset export``.

The objects are real files on a real hippocampus case: RTSTRUCTs written by rt-utils (``RTStructBuilder.add_roi``,
whose ``roi_generation_algorithm`` defaults to AUTOMATIC) and by the project's generator, SEGs by highdicom
with the headers the viewers write (docs/data.md, "Human or machine", cites their code).
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from tests.conftest import HIPPOCAMPUS, dicom_dataset_maker, run_main

CLASSES = ["Anterior", "Posterior"]
READER = "Reader^Jane"  # a person's name in ContentCreatorName: matched by a rule, never printed


def _maker():
    return dicom_dataset_maker()


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[pydicom.Dataset], np.ndarray, object]:
    """One real hippocampus case as an MR series (no label yet)."""
    if not (HIPPOCAMPUS / "dataset.json").is_file():
        pytest.skip(f"real hippocampus data not found at {HIPPOCAMPUS} (see ../shared/data/README.md)")
    maker = _maker()
    entry = json.loads((HIPPOCAMPUS / "dataset.json").read_text())["training"][0]
    img = nib.load(str(HIPPOCAMPUS / entry["image"]))
    label = np.asarray(nib.load(str(HIPPOCAMPUS / entry["label"])).dataobj).astype(np.uint8)
    folder = tmp_path_factory.mktemp("origin") / "study"
    slices = maker.write_mr_series(np.asarray(img.dataobj, dtype=np.float64), img.affine, folder / "mr", "P0001",
                                   pydicom.uid.generate_uid(), datetime(2026, 1, 1, 8))
    return folder, slices, label, maker


def _rt_utils_rtstruct(folder: Path, slices: list[pydicom.Dataset], label: np.ndarray, path: Path, when: datetime,
                       description: str = "", **kwargs: str) -> str:
    """An RTSTRUCT written by rt-utils from the label (ROIGenerationAlgorithm: rt-utils' default unless given)."""
    rt_utils = pytest.importorskip("rt_utils", reason="rt-utils is not installed (the test extra brings it)")
    rt = rt_utils.RTStructBuilder.create_new(str(folder / "mr"))
    k_of = {s.SOPInstanceUID: k for k, s in enumerate(slices)}
    order = [k_of[s.SOPInstanceUID] for s in rt.series_data]
    for value, name in enumerate(CLASSES, start=1):
        rt.add_roi(mask=np.stack([label[:, :, k].T == value for k in order], axis=-1), name=name, **kwargs)
    if description:
        rt.set_series_description(description)
    rt.save(str(path))
    ds = pydicom.dcmread(path)
    ds.StructureSetDate, ds.StructureSetTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.save_as(path)
    return str(ds.SOPInstanceUID)


def _config(tmp_path: Path, source: Path, extra: str = "") -> Path:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"data:\n  dataset: {source}\n  classes: [{', '.join(CLASSES)}]\n{extra}")
    return cfg


def _check(tmp_path: Path, source: Path, extra: str = ""):
    return run_main("dataset", "check", str(source), "--config", str(_config(tmp_path, source, extra)),
                    "--work-dir", str(tmp_path / "work"))


def _export(tmp_path: Path, source: Path, extra: str = "") -> dict:
    out = tmp_path / "export"
    result = run_main("dataset", "export", str(source), "--config", str(_config(tmp_path, source, extra)),
                      "--out", str(out), "--work-dir", str(tmp_path / "work"))
    assert result.returncode == 0, result.stderr
    return json.loads((out / "manifest.json").read_text())


def test_an_rt_utils_auto_contour_is_set_aside_and_a_recognised_reader_edit_trains(case, tmp_path: Path) -> None:
    folder, slices, label, _ = case
    source = tmp_path / "src"
    shutil.copytree(folder / "mr", source / "study" / "mr")
    auto = _rt_utils_rtstruct(folder, slices, label, source / "study" / "auto.dcm", datetime(2026, 2, 1, 9))
    # The auto-contour alone: no training label, and check says why and how to accept it knowingly.
    alone = _check(tmp_path, source)
    assert alone.returncode == 2
    assert f"not used           {auto}: AUTOMATIC RTSTRUCT ROI(s)" in alone.stdout
    assert "1 label(s) set aside as AUTOMATIC" in alone.stdout and "data.allow_automatic_labels: true" in alone.stdout
    accepted = _export(tmp_path, source, "  allow_automatic_labels: true\n")
    assert [(c["label_sop_instance_uid"], c["algorithm_type"]) for c in accepted["cases"]] == [(auto, "AUTOMATIC")]
    # A reader's edit, saved later by a tool that keeps rt-utils' AUTOMATIC default: a rule on its series
    # description recognises it; the older auto-contour is then superseded, and the edit is a correction.
    edit = _rt_utils_rtstruct(folder, slices, label, source / "study" / "edit.dcm", datetime(2026, 2, 2, 9),
                              description="reviewed by reader")
    rule = "  reader_edit_rules:\n    - {SeriesDescription: '^reviewed', ManufacturerModelName: rt-utils}\n"
    ignored = _check(tmp_path, source)
    assert ignored.returncode == 2 and "2 label(s) set aside as AUTOMATIC" in ignored.stdout
    manifest = _export(tmp_path, source, rule)
    assert [(c["label_sop_instance_uid"], c["algorithm_type"], c["reader_edit_rule"], c["reader_correction"])
            for c in manifest["cases"]] == [(edit, "AUTOMATIC", 1, True)]
    recognised = _check(tmp_path, source, rule)
    assert f"{auto}: superseded by the newer label {edit}" in recognised.stdout
    assert "set aside as AUTOMATIC" not in recognised.stdout


def test_rois_are_judged_per_roi_and_the_structure_set_date_decides_the_newest(case, tmp_path: Path) -> None:
    """A MANUAL structure set with an AUTOMATIC body outline that no class asks for is a reader's; the newer of
    two structure sets by StructureSetDate/Time is used, whatever their series dates say."""
    folder, slices, label, maker = case
    source = tmp_path / "src"
    shutil.copytree(folder / "mr", source / "study" / "mr")
    older = maker.write_rtstruct(label, slices, CLASSES, source / "study" / "older.dcm", datetime(2026, 3, 1, 9))
    newer_path = source / "study" / "newer.dcm"
    newer = maker.write_rtstruct(label, slices, CLASSES, newer_path, datetime(2026, 3, 2, 9))
    ds = pydicom.dcmread(newer_path)
    body = pydicom.Dataset()
    body.ROINumber, body.ROIName, body.ROIGenerationAlgorithm = 9, "Body", "AUTOMATIC"
    body.ReferencedFrameOfReferenceUID = ds.StructureSetROISequence[0].ReferencedFrameOfReferenceUID
    ds.StructureSetROISequence.append(body)
    ds.SeriesDate = "20200101"  # an older series date must not make it the older label
    ds.save_as(newer_path)
    manifest = _export(tmp_path, source)
    assert [(c["label_sop_instance_uid"], c["algorithm_type"]) for c in manifest["cases"]] == [(newer, "MANUAL")]
    result = _check(tmp_path, source)
    assert f"{older}: superseded by the newer label {newer}" in result.stdout
    # The same body outline marked for a configured class makes the structure set automatic.
    ds.StructureSetROISequence[1].ROIGenerationAlgorithm = "AUTOMATIC"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(newer_path)
    manifest = _export(tmp_path, source)
    assert [c["label_sop_instance_uid"] for c in manifest["cases"]] == [older]


def test_a_viewer_edit_of_a_model_seg_is_recognised_by_a_rule_and_the_model_seg_never(case, tmp_path: Path) -> None:
    """The model's SEG (Manufacturer unet-pipeline) and a reader's edit of it that keeps AUTOMATIC and the model's
    series description (as OHIF and Slicer do) and names its reader in ContentCreatorName: a rule on the series
    description alone cannot take the model's own SEG; a rule on the creator takes the edit, and the reader's
    name is printed nowhere."""
    folder, slices, label, maker = case
    source = tmp_path / "src"
    shutil.copytree(folder / "mr", source / "study" / "mr")
    model_path, edit_path = source / "study" / "model.dcm", source / "study" / "edit.dcm"
    model = maker.write_seg(label, slices, CLASSES, model_path, datetime(2026, 4, 1, 9), automatic=True,
                            description="unet-pipeline hippocampus v3")
    ds = pydicom.dcmread(model_path)
    ds.Manufacturer = "unet-pipeline"
    ds.save_as(model_path)
    by_description = "  reader_edit_rules:\n    - {SeriesDescription: '^unet-pipeline '}\n"
    own = _check(tmp_path, source, by_description)
    assert own.returncode == 2 and f"{model}: AUTOMATIC SEG segment(s)" in own.stdout
    assert "1 label(s) set aside as AUTOMATIC" in own.stdout
    corrected = label.copy()
    corrected[(label == 2) & (np.arange(label.shape[2]) % 2 == 0)[None, None, :]] = 1
    maker.write_seg(corrected, slices, CLASSES, edit_path, datetime(2026, 4, 2, 9), automatic=True,
                    description="unet-pipeline hippocampus v3")
    ds = pydicom.dcmread(edit_path)
    ds.Manufacturer, ds.ContentCreatorName = "Unspecified", READER  # dcmjs' default manufacturer
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(edit_path)
    edit = str(ds.SOPInstanceUID)
    manifest = _export(tmp_path, source, by_description)
    assert [(c["label_sop_instance_uid"], c["reader_edit_rule"]) for c in manifest["cases"]] == [(edit, 1)]
    by_creator = "  reader_edit_rules:\n    - {ManufacturerModelName: '^MONAI Label$'}\n    - {ContentCreatorName: jane}\n"
    result = _check(tmp_path, source, by_creator)
    assert result.returncode == 0 and f"{model}: superseded by the newer label {edit}" in result.stdout
    manifest = _export(tmp_path, source, by_creator)
    assert [(c["label_sop_instance_uid"], c["reader_edit_rule"], c["reader_correction"])
            for c in manifest["cases"]] == [(edit, 2, True)]
    for text in (result.stdout, result.stderr, json.dumps(manifest)):
        assert "Jane" not in text
    # Without a rule, both are a model's output: nothing trains.
    nothing = _check(tmp_path, source)
    assert nothing.returncode == 2 and "2 label(s) set aside as AUTOMATIC" in nothing.stdout


def test_a_rule_must_name_known_attributes_and_hold_regular_expressions(case, tmp_path: Path) -> None:
    folder = case[0]
    for rule, reason in (("{PatientName: x}", "names 'PatientName', not one of"),
                         ("{SeriesDescription: '('}", "not a regular expression"), ("{}", "is empty")):
        result = _check(tmp_path, folder, f"  reader_edit_rules:\n    - {rule}\n")
        assert result.returncode == 2 and reason in result.stderr and "Traceback" not in result.stderr
