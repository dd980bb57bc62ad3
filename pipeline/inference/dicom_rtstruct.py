"""DICOM RTSTRUCT of a predicted label map, for radiotherapy planning systems that take structures, not SEGs.

Each foreground class becomes one ROI, marked ``ROIGenerationAlgorithm`` AUTOMATIC (a model drew it,
so this project never trains on it again as a reader's label) and identified by the same series
description as the SEG. Its contours are traced slice by slice with contourpy at the 0.75 level of the
class mask: the outline runs a quarter of a voxel outside the centres of the boundary voxels. That one
choice round-trips with every common reader, which were measured on it (docs/pacs.md):

* centre-inside readers (plastimatch, most planning systems) take every voxel whose centre the outline
  encloses: the boundary voxels are a quarter voxel inside it, their outside neighbours three quarters
  outside;
* readers that round the points to the voxel grid and fill the polygon with its edges (rt-utils,
  ``cv2.fillPoly``) land every point on a boundary voxel's centre;
* this project's reader (centre inside or on the outline, even-odd) takes the same voxels.

An island, a hole and a structure that touches the volume's edge each get their own closed contour
(the mask is padded by one empty voxel before tracing). Nothing from the sources' headers is logged:
identifying tags are copied into the RTSTRUCT only, where they belong.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import Staged, save_file
from pipeline.errors import InputDataError
from pipeline.inference.dicom_seg import Algorithm, _quiet_dicom_libraries

RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
#: The iso-level the outline is traced at: 0.75 puts it a quarter voxel outside the boundary voxels' centres.
TRACE_LEVEL = 0.75
# Patient and study attributes an RTSTRUCT copies from its images (Type 2: present, maybe empty).
_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                  "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName")
_COLOURS = ((255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 200, 0), (200, 0, 255), (0, 200, 200))


def trace_slice(plane: np.ndarray) -> list[np.ndarray]:
    """The closed outlines of a 2D mask, in continuous (column, row) voxel coordinates, without a repeated end point.

    Args:
        plane: a boolean mask indexed ``[row, column]``.
    """
    import contourpy

    padded = np.pad(plane.astype(np.float64), 1)  # a structure on the edge still gets a closed outline
    lines = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate).lines(TRACE_LEVEL)
    outlines = []
    for line in lines:
        points = np.asarray(line, dtype=np.float64)[:-1] - 1.0  # contourpy closes a line by repeating its start
        if len(points) >= 3:
            outlines.append(points)
    return outlines


def write_dicom_rtstruct(
    labels: np.ndarray, source_files: Sequence[Path], label_names: Mapping[int, str], algorithm: Algorithm,
    path: Path, staged: Staged | None = None,
) -> Path:
    """Write an RTSTRUCT of ``labels`` on the series ``source_files``, one AUTOMATIC ROI per class, atomically.

    Every class of ``label_names`` gets an ROI (an empty class gets an ROI without contours, as a
    planning system expects the structure list of the model whatever it found).

    Args:
        labels: ``(columns, rows, slices)`` label map on the series' grid (the reader's (i, j, k) order).
        source_files: the series' files in the label map's slice order.
        label_names: foreground label value -> ROI name.
        algorithm: the model's identity (series description, manufacturer model name, software versions).
        path: the target ``.dcm``.
        staged: write as part of these staged files (committed together); default: on its own.

    Raises:
        InputDataError: the sources cannot carry contours (no geometry, or as many files as slices they are not).
    """
    import pydicom

    with _quiet_dicom_libraries():
        datasets = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in source_files]
        if labels.shape[2] != len(datasets):
            raise InputDataError(Path(source_files[0]).parent,
                                 f"label map has {labels.shape[2]} slices but the series {len(datasets)} files")
        try:
            ds = _structure_set(labels, datasets, label_names, algorithm)
        except (AttributeError, KeyError, ValueError, IndexError) as error:
            # A header value may be patient data: only the kind of error is shown.
            raise InputDataError(Path(source_files[0]).parent, f"cannot be referenced by an RTSTRUCT "
                                                               f"({type(error).__name__} in its geometry)") from None
        save_file(path, staged, ".dcm", lambda tmp: ds.save_as(tmp, enforce_file_format=True))
    return path


def _structure_set(labels: np.ndarray, datasets: list[Any], label_names: Mapping[int, str],
                   algorithm: Algorithm) -> Any:
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    first = datasets[0]
    now = datetime.now()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = RTSTRUCT_STORAGE, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = first.get("SpecificCharacterSet", "ISO_IR 100")
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_STORAGE, meta.MediaStorageSOPInstanceUID
    for keyword in _PATIENT_STUDY:
        setattr(ds, keyword, first.get(keyword, ""))
    ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = "RTSTRUCT", generate_uid(), 1
    ds.SeriesNumber = _series_number(first)
    ds.SeriesDescription = algorithm.series_description
    ds.Manufacturer, ds.ManufacturerModelName = "unet-pipeline", algorithm.name[:64]
    ds.SoftwareVersions, ds.OperatorsName = algorithm.software_version[:64], ""
    ds.StructureSetLabel = algorithm.name[:16]
    ds.StructureSetName = f"{algorithm.name} {algorithm.version}"[:64]
    ds.StructureSetDate = ds.SeriesDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = ds.SeriesTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    frame_uid = str(first.FrameOfReferenceUID)
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    contour_images = []
    for source in datasets:
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
        contour_images.append(item)
    ref_series = pydicom.Dataset()
    ref_series.SeriesInstanceUID = first.SeriesInstanceUID
    ref_series.ContourImageSequence = contour_images
    ref_study = pydicom.Dataset()
    ref_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management, as RT objects name it
    ref_study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    ref_study.RTReferencedSeriesSequence = [ref_series]
    ref_frame = pydicom.Dataset()
    ref_frame.FrameOfReferenceUID = frame_uid
    ref_frame.RTReferencedStudySequence = [ref_study]
    ds.ReferencedFrameOfReferenceSequence = [ref_frame]
    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = [], [], []
    geometry = [_slice_geometry(s) for s in datasets]
    values = sorted(v for v in label_names if v != 0)
    for number, value in enumerate(values, start=1):
        roi = pydicom.Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID = number, frame_uid
        roi.ROIName = str(label_names[value])[:64]
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = f"{algorithm.name} {algorithm.version}"[:64]
        ds.StructureSetROISequence.append(roi)
        contours = pydicom.Dataset()
        contours.ReferencedROINumber = number
        contours.ROIDisplayColor = list(_COLOURS[(number - 1) % len(_COLOURS)])
        contours.ContourSequence = []
        for k, source in enumerate(datasets):
            plane = labels[:, :, k].T == value  # (rows, columns)
            if not plane.any():
                continue
            origin, u, v = geometry[k]
            for outline in trace_slice(plane):
                points = origin + np.outer(outline[:, 0], u) + np.outer(outline[:, 1], v)
                contour = pydicom.Dataset()
                image = pydicom.Dataset()
                image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
                contour.ContourImageSequence = [image]
                contour.ContourGeometricType, contour.NumberOfContourPoints = "CLOSED_PLANAR", len(points)
                contour.ContourData = [f"{x:.4f}" for x in points.ravel()]
                contours.ContourSequence.append(contour)
        ds.ROIContourSequence.append(contours)
        observation = pydicom.Dataset()
        observation.ObservationNumber, observation.ReferencedROINumber = number, number
        observation.RTROIInterpretedType, observation.ROIInterpreter = "ORGAN", ""
        ds.RTROIObservationsSequence.append(observation)
    return ds


def _slice_geometry(source: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A slice's first voxel centre and the world steps of one column and one row (LPS millimetres)."""
    orientation = np.asarray(source.ImageOrientationPatient, dtype=np.float64)
    row_spacing, column_spacing = (float(x) for x in source.PixelSpacing)  # between rows, between columns
    origin = np.asarray(source.ImagePositionPatient, dtype=np.float64)
    return origin, orientation[:3] * column_spacing, orientation[3:] * row_spacing


def _series_number(source: Any) -> int:
    number = source.get("SeriesNumber", None)
    try:
        return int(number) + 2000 if number not in (None, "") else 2000
    except (TypeError, ValueError):
        return 2000
