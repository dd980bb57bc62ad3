"""Turn labelled NIfTI cases (an MSD folder) into a DICOM study per case: an MR series, and a SEG or RTSTRUCT label.

What a lab's PACS export looks like, made from data whose truth is known: the tests compare what
``unet-pipeline dataset export`` reads back with the NIfTI originals, and ``scripts/bench_dataset.py``
loads the studies into Orthanc. The SEG is written by highdicom, the RTSTRUCT's contours are traced
by contourpy (matplotlib's contour engine) at the 0.5 level of each slice's mask.

    python scripts/make_dicom_dataset.py ../shared/data/hippocampus OUT --cases 20 --rtstruct-every 4
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timedelta
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def rotation(degrees: float) -> np.ndarray:
    """A 4x4 rotation about the world's first axis (an oblique acquisition when ``degrees`` is not 0).

    Args:
        degrees: the angle.
    """
    a = np.deg2rad(degrees)
    r = np.eye(4)
    r[1:3, 1:3] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return r


def write_mr_series(volume: np.ndarray, affine_ras: np.ndarray, folder: Path, patient: str, study_uid: str,
                    when: datetime, series_uid: str | None = None, frame_uid: str | None = None,
                    description: str = "T1 hippocampus", modality: str = "MR") -> list[pydicom.Dataset]:
    """One MR (or CT) file per slice of ``volume`` (axes i, j, k; k the slices), with the geometry of ``affine_ras``.

    Args:
        volume: the image.
        affine_ras: its voxel -> RAS world map.
        folder: where to write (created).
        patient: PatientID (and name) of the synthetic patient.
        study_uid: the study.
        when: the study's date and time.
        series_uid: its SeriesInstanceUID (default: a new one).
        frame_uid: its FrameOfReferenceUID (default: a new one).
        description: its SeriesDescription.
        modality: ``MR`` or ``CT`` (CT Image Storage, for the head-and-neck organs).

    Returns:
        The slices, in k order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lps = LPS @ affine_ras
    sx, sy, sz = (np.linalg.norm(lps[:3, a]) for a in range(3))
    u, v = lps[:3, 0] / sx, lps[:3, 1] / sy
    lo, hi = float(volume.min()), float(volume.max())
    slope = (hi - lo) / 4095 if hi > lo else 1.0
    stored = np.round((volume - lo) / slope).astype(np.uint16)
    series_uid, frame_uid = series_uid or generate_uid(), frame_uid or generate_uid()
    sop_class = CT_STORAGE if modality == "CT" else MR_STORAGE
    slices = []
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = f"{patient}^Test", patient, "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate = ds.SeriesDate = when.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = when.strftime("%H%M%S")
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = modality, 1, k + 1, description
        ds.Manufacturer, ds.PositionReferenceIndicator = "unet-pipeline test", ""
        ds.ImagePositionPatient = [float(x) for x in (lps @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [float(x) for x in (*u, *v)]
        ds.PixelSpacing, ds.SliceThickness = [float(sy), float(sx)], float(sz)
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}"[:16], f"{lo:.10g}"[:16]
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        ds.save_as(folder / f"{generate_uid()[-12:]}.dcm", enforce_file_format=True)
        slices.append(ds)
    return slices


def hn_ct_case(image: Path, label: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A ``../shared/data/hn_ct`` case as an axial CT volume: (volume, label, RAS affine) for :func:`write_mr_series`.

    Its NIfTI files hold the spacing only (axis 0 anterior-posterior, 1 left-right, 2 superior-inferior):
    the arrays are reordered so that columns run along LPS x, rows along y and slices up along z
    (ImageOrientationPatient 1/0/0/0/1/0), the common axial geometry of planning CTs. The files do not say
    which way each axis runs, so the world's left and right are a choice here (label names are not checked
    against them); a round trip through any writer and reader is unaffected.

    Args:
        image: the case's CT NIfTI.
        label: its label map.
    """
    img = nib.load(str(image))
    spacing = np.abs(np.diag(img.affine))[:3]
    volume = np.asarray(img.dataobj, dtype=np.float64).transpose(1, 0, 2)[:, :, ::-1]
    labels = np.asarray(nib.load(str(label)).dataobj).astype(np.uint8).transpose(1, 0, 2)[:, :, ::-1]
    return volume, labels, np.diag([-spacing[1], -spacing[0], spacing[2], 1.0])


def _planes(label: np.ndarray, value: int) -> np.ndarray:
    """(k, rows, columns) masks of one class, as the SEG frames and the slices store them."""
    return np.transpose(label == value, (2, 1, 0))


def write_seg(label: np.ndarray, slices: list[pydicom.Dataset], classes: list[str], path: Path, when: datetime,
              automatic: bool = False, fractional: bool = False, description: str = "reader") -> str:
    """A DICOM SEG (highdicom) of every class of ``label`` (axes i, j, k), over the slices that hold any.

    Args:
        label: the label map on the series' grid.
        slices: the series' slices in k order.
        classes: class names, label 1 first (the segment labels).
        path: the file to write.
        when: its content date and time.
        automatic: AUTOMATIC segments (a model's output) instead of MANUAL.
        fractional: a FRACTIONAL SEG instead of BINARY.
        description: its SeriesDescription.

    Returns:
        Its SOPInstanceUID.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    keep = [k for k in range(label.shape[2]) if label[:, :, k].any()]
    masks = np.stack([_planes(label, v)[keep] for v in range(1, len(classes) + 1)], axis=-1)
    kind = hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC if automatic else hd.seg.SegmentAlgorithmTypeValues.MANUAL
    algorithm = hd.AlgorithmIdentificationSequence(name="test-model", family=codes.cid7162.ArtificialIntelligence,
                                                   version="1") if automatic else None
    segments = [hd.seg.SegmentDescription(
        segment_number=n, segment_label=name, segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=kind, algorithm_identification=algorithm)
        for n, name in enumerate(classes, start=1)]
    seg = hd.seg.Segmentation(
        source_images=[slices[k] for k in keep], pixel_array=masks.astype(np.float32 if fractional else np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL if fractional else hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=100, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="unet-pipeline test", manufacturer_model_name="test", software_versions="1",
        device_serial_number="0", series_description=description,
        content_date=when.date(), content_time=when.time())
    seg.save_as(path)
    return str(seg.SOPInstanceUID)


def write_rtstruct(label: np.ndarray, slices: list[pydicom.Dataset], classes: list[str], path: Path,
                   when: datetime) -> str:
    """An RTSTRUCT whose ROIs (named by class) are the 0.5 contours of each class on each slice.

    Args:
        label: the label map on the series' grid (axes i, j, k).
        slices: the series' slices in k order.
        classes: class names, label 1 first (the ROI names).
        path: the file to write.
        when: its structure set date and time.

    Returns:
        Its SOPInstanceUID.
    """
    import contourpy

    first = slices[0]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = RTSTRUCT_STORAGE, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_STORAGE, meta.MediaStorageSOPInstanceUID
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
               "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        setattr(ds, kw, first.get(kw, ""))
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = "RTSTRUCT", generate_uid(), 200, 1
    ds.StructureSetLabel, ds.Manufacturer = "reader", "unet-pipeline test"
    ds.StructureSetDate, ds.StructureSetTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.SeriesDate, ds.SeriesTime = ds.StructureSetDate, ds.StructureSetTime
    ref_series = pydicom.Dataset()
    ref_series.SeriesInstanceUID = first.SeriesInstanceUID
    ref_series.ContourImageSequence = [pydicom.Dataset() for _ in slices]
    for item, s in zip(ref_series.ContourImageSequence, slices):
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = s.SOPClassUID, s.SOPInstanceUID
    ref_study = pydicom.Dataset()
    ref_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    ref_study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    ref_study.RTReferencedSeriesSequence = [ref_series]
    ref_frame = pydicom.Dataset()
    ref_frame.FrameOfReferenceUID = first.FrameOfReferenceUID
    ref_frame.RTReferencedStudySequence = [ref_study]
    ds.ReferencedFrameOfReferenceSequence = [ref_frame]
    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = [], [], []
    u, v = np.asarray(first.ImageOrientationPatient[:3], float), np.asarray(first.ImageOrientationPatient[3:], float)
    sy, sx = (float(x) for x in first.PixelSpacing)
    for number, name in enumerate(classes, start=1):
        roi = pydicom.Dataset()
        roi.ROINumber, roi.ROIName, roi.ROIGenerationAlgorithm = number, name, "MANUAL"
        roi.ReferencedFrameOfReferenceUID = first.FrameOfReferenceUID
        ds.StructureSetROISequence.append(roi)
        contours = pydicom.Dataset()
        contours.ReferencedROINumber, contours.ROIDisplayColor, contours.ContourSequence = number, [255, 0, 0], []
        for k, plane in enumerate(_planes(label, number)):
            if not plane.any():
                continue
            origin = np.asarray(slices[k].ImagePositionPatient, float)
            padded = np.pad(plane.astype(float), 1)
            for line in contourpy.contour_generator(z=padded).lines(0.5):
                cols, rows = line[:-1, 0] - 1, line[:-1, 1] - 1  # contourpy closes lines by repeating the start
                points = origin + np.outer(cols * sx, u) + np.outer(rows * sy, v)
                contour = pydicom.Dataset()
                contour.ContourGeometricType, contour.NumberOfContourPoints = "CLOSED_PLANAR", len(points)
                contour.ContourData = [f"{x:.4f}" for x in points.ravel()]
                contours.ContourSequence.append(contour)
        ds.ROIContourSequence.append(contours)
        obs = pydicom.Dataset()
        obs.ObservationNumber, obs.ReferencedROINumber, obs.RTROIInterpretedType, obs.ROIInterpreter = number, number, "ORGAN", ""
        ds.RTROIObservationsSequence.append(obs)
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def make_study(image: Path, label: Path, out: Path, classes: list[str], index: int, kind: str = "SEG",
               oblique_deg: float = 0.0) -> dict[str, str]:
    """One case as a DICOM study in ``out/study_INDEX/``: the MR series and its label object.

    Args:
        image: the NIfTI image.
        label: the NIfTI label map.
        out: the DICOM folder.
        classes: class names, label 1 first.
        index: the case's number (patient id, study time).
        kind: ``SEG`` or ``RTSTRUCT``.
        oblique_deg: tilt the acquisition by this angle (the label goes with it).

    Returns:
        ``series_uid``, ``label_sop_uid``, the NIfTI ``image``/``label`` paths, ``kind``.
    """
    img, lab = nib.load(str(image)), nib.load(str(label))
    affine = rotation(oblique_deg) @ img.affine
    when = datetime(2026, 1, 1, 8) + timedelta(minutes=index)
    folder = out / f"study_{index:04d}"
    slices = write_mr_series(np.asarray(img.dataobj, dtype=np.float64), affine, folder / "mr", f"P{index:04d}",
                             generate_uid(), when)
    label_array = np.asarray(lab.dataobj).astype(np.uint8)
    path = folder / "label.dcm"
    writer = write_seg if kind == "SEG" else write_rtstruct
    sop = writer(label_array, slices, classes, path, when + timedelta(hours=1))
    return {"series_uid": str(slices[0].SeriesInstanceUID), "label_sop_uid": sop, "image": str(image),
            "label": str(label), "kind": kind}


def main() -> None:
    """Write the studies and ``cases.json`` (what each study was made from)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", type=Path, help="an MSD folder (dataset.json, imagesTr, labelsTr)")
    p.add_argument("out", type=Path, help="the DICOM folder to write")
    p.add_argument("--cases", type=int, default=20, help="how many cases (the first, in dataset.json order)")
    p.add_argument("--rtstruct-every", type=int, default=4, help="every Nth case gets an RTSTRUCT instead of a SEG")
    args = p.parse_args()
    meta = json.loads((args.dataset / "dataset.json").read_text())
    classes = [n for v, n in sorted((int(k), v) for k, v in meta["labels"].items()) if v != 0]
    made = []
    for n, entry in enumerate(meta["training"][: args.cases]):
        kind = "RTSTRUCT" if args.rtstruct_every and n % args.rtstruct_every == args.rtstruct_every - 1 else "SEG"
        made.append(make_study(args.dataset / entry["image"], args.dataset / entry["label"], args.out, classes, n, kind))
    (args.out / "cases.json").write_text(json.dumps(made, indent=1))
    print(f"{len(made)} studies in {args.out}")


if __name__ == "__main__":
    main()
