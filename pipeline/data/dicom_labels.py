"""Label objects as training labels: DICOM SEG and RTSTRUCT, their headers, and their masks on an image's voxel grid.

A label object is turned into one mask per configured class, on the grid of the image series it
references (the grid :func:`transforms.dicom.read_dicom_series` reads, so the label and the image
share their geometry exactly). SEG frames are read with highdicom and placed by their positions in
space, so SEGs of a subset of slices, of multi-frame sources and of oblique series all land where
they belong; RTSTRUCT contours are rasterised slice by slice (a voxel is inside when its centre is, by
the even-odd rule, so an inner contour is a hole, or when its centre lies on an outline: see :func:`_roi_mask`).

Every reason a label cannot be used raises :class:`LabelProblem` with one line that names no
patient: only UIDs, segment and ROI names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk

from pipeline.config import READER_EDIT_ATTRIBUTES

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
#: Algorithm types that count as a reader's work: SEG's SegmentAlgorithmType, RTSTRUCT's ROIGenerationAlgorithm.
HUMAN = ("MANUAL", "SEMIAUTOMATIC")
_GRID_TOL = 0.1  # voxels: how far a frame or contour may sit from the image's grid and still be placed on it


class LabelProblem(Exception):
    """A label object that cannot be used; its message is the one-line reason."""


@dataclass
class LabelHeader:
    """What selection needs of a label object (no patient fields).

    Args:
        path: the file.
        sop_uid: its SOPInstanceUID.
        kind: ``SEG`` or ``RTSTRUCT``.
        study_uid: its StudyInstanceUID.
        series_uid: the SeriesInstanceUID of the IMAGE series it references ("" when it names none).
        frame_of_reference_uid: the frame of reference its contours or frames are in.
        algorithm_type: ``MANUAL``, ``SEMIAUTOMATIC`` or ``AUTOMATIC`` (the least human of its segments or ROIs).
        when: ``YYYYMMDDHHMMSS...`` from StructureSetDate/Time (RTSTRUCT) or ContentDate/Time, else
            SeriesDate/Time ("" when absent).
        names: segment labels or ROI names, in the object's order.
        algorithms: each segment's SegmentAlgorithmType or ROI's ROIGenerationAlgorithm, in ``names``' order
            (an RTSTRUCT ROI that leaves it empty, as DICOM allows, counts as MANUAL; a SEG segment as AUTOMATIC).
        attributes: the values of ``READER_EDIT_ATTRIBUTES`` (``pipeline.config``), for ``data.reader_edit_rules``;
            never printed or logged (ContentCreatorName is a person's name).
    """

    path: Path
    sop_uid: str
    kind: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    algorithm_type: str
    when: str
    names: list[str] = field(default_factory=list)
    algorithms: list[str] = field(default_factory=list)
    attributes: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)

    @property
    def is_human(self) -> bool:
        """A reader made all of it (every segment or ROI MANUAL or SEMIAUTOMATIC)."""
        return self.algorithm_type in HUMAN

    def algorithm_for(self, matcher: ClassMatcher) -> str:
        """The least human algorithm type of the segments or ROIs that stand for a configured class.

        An auto-contoured structure the config does not ask for does not make a reader's ROIs automatic;
        when no segment matches (the label is skipped later for that), the whole object's type.

        Args:
            matcher: the configured classes.
        """
        types = {a for n, a in zip(self.names, self.algorithms) if matcher.value_of(n) is not None}
        return _least_human(types) if types else self.algorithm_type


def _least_human(types: set[str]) -> str:
    if "AUTOMATIC" in types or not types:
        return "AUTOMATIC"
    return "SEMIAUTOMATIC" if "SEMIAUTOMATIC" in types else "MANUAL"


def _when(ds: pydicom.Dataset) -> str:
    # A structure set's own date comes first: an RTSTRUCT has no ContentDate, and its series may be older.
    for date_kw, time_kw in (("StructureSetDate", "StructureSetTime"), ("ContentDate", "ContentTime"),
                             ("SeriesDate", "SeriesTime"), ("InstanceCreationDate", "InstanceCreationTime")):
        date = str(ds.get(date_kw, "") or "").strip()
        if date:
            return date + str(ds.get(time_kw, "") or "").strip().ljust(6, "0")
    return ""


def _referenced_series(ds: pydicom.Dataset, kind: str) -> str:
    try:
        if kind == "SEG":
            return str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
        frame = ds.ReferencedFrameOfReferenceSequence[0]
        return str(frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].SeriesInstanceUID)
    except (AttributeError, IndexError, KeyError):
        return ""


def read_label_header(path: Path) -> LabelHeader | None:
    """The header of a SEG or RTSTRUCT file, or ``None`` when the file is not one.

    Args:
        path: a DICOM file.

    Raises:
        LabelProblem: a SEG or RTSTRUCT whose header cannot be read.
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)  # no preamble/file meta in some tools' files
    except Exception:  # not DICOM, or unreadable: not a label object we can name
        return None
    sop_class = str(ds.get("SOPClassUID", ""))
    kind = {SEG_SOP_CLASS: "SEG", RTSTRUCT_SOP_CLASS: "RTSTRUCT"}.get(sop_class)
    if kind is None:
        return None
    sop_uid = str(ds.get("SOPInstanceUID", "") or "")
    if not sop_uid:
        raise LabelProblem(f"a {kind} without SOPInstanceUID")
    if kind == "SEG":
        segments = list(ds.get("SegmentSequence", []))
        names = [str(s.get("SegmentLabel", "") or "") for s in segments]
        # SegmentAlgorithmType is Type 1: a segment without it is not known to be a reader's.
        algorithms = [str(s.get("SegmentAlgorithmType", "") or "").strip().upper() or "AUTOMATIC" for s in segments]
        frame_of_reference = str(ds.get("FrameOfReferenceUID", "") or "")
    else:
        rois = list(ds.get("StructureSetROISequence", []))
        names = [str(r.get("ROIName", "") or "") for r in rois]
        # ROIGenerationAlgorithm is Type 2 (may be empty): a structure set that does not say is taken as drawn.
        algorithms = [str(r.get("ROIGenerationAlgorithm", "") or "").strip().upper() or "MANUAL" for r in rois]
        refs = ds.get("ReferencedFrameOfReferenceSequence", [])
        frame_of_reference = str(refs[0].get("FrameOfReferenceUID", "")) if refs else ""
    attributes = {kw: (str(ds.get(kw, "") or ""),) for kw in READER_EDIT_ATTRIBUTES if kw != "SegmentAlgorithmName"}
    attributes["SegmentAlgorithmName"] = tuple(str(s.get("SegmentAlgorithmName", "") or "")
                                               for s in ds.get("SegmentSequence", []))
    return LabelHeader(path, sop_uid, kind, str(ds.get("StudyInstanceUID", "") or ""), _referenced_series(ds, kind),
                       frame_of_reference, _least_human(set(algorithms)) if algorithms or kind == "SEG" else "MANUAL",
                       _when(ds), names, algorithms, attributes)


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name).strip().casefold()


@dataclass(frozen=True)
class ClassMatcher:
    """Which segment or ROI is which class: by name (case-insensitive, ``_``/``-``/spaces alike), alias or code.

    Args:
        classes: class names in label order (value 1 first).
        aliases: class name -> other names, or codes ``SCHEME:VALUE`` of SegmentedPropertyTypeCodeSequence.
    """

    classes: tuple[str, ...]
    aliases: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @classmethod
    def from_config(cls, classes: list[str], aliases: dict[str, list[str]] | None) -> ClassMatcher:
        """From ``data.classes`` and ``data.label_aliases``.

        Args:
            classes: class names in label order.
            aliases: class name -> aliases (names or ``SCHEME:VALUE`` codes).
        """
        return cls(tuple(classes), tuple((k, tuple(v)) for k, v in (aliases or {}).items()))

    def value_of(self, name: str, codes: tuple[str, ...] = ()) -> int | None:
        """The label value (1-based) of the class a segment/ROI name (or one of its codes) stands for.

        Args:
            name: SegmentLabel or ROIName (or the property type's CodeMeaning).
            codes: ``SCHEME:VALUE`` of the segment's property type.
        """
        wanted = {_norm(name)} | {_norm(c) for c in codes}
        alias_map = dict(self.aliases)
        for value, cls_name in enumerate(self.classes, start=1):
            names = {_norm(cls_name)} | {_norm(a) for a in alias_map.get(cls_name, ())}
            if wanted & names:
                return value
        return None


def image_affine_lps(image: sitk.Image) -> np.ndarray:
    """The 4x4 map from SimpleITK index (x, y, z) to LPS millimetres (the reader's RAS affine, back in LPS).

    Args:
        image: a 3D SimpleITK image.
    """
    from transforms.dicom import LPS_TO_RAS, affine_from_sitk

    return LPS_TO_RAS @ affine_from_sitk(image)


def place_on_grid(array: np.ndarray, affine: np.ndarray, ref_affine: np.ndarray, ref_shape: tuple[int, ...],
                  what: str) -> np.ndarray:
    """Put ``array`` (spatial axes first) into a zero array on the reference grid, without resampling.

    The two grids must share voxel size and axes (up to order and sign) and be offset by whole voxels.

    Args:
        array: the source array, spatial axes first, channels after.
        affine: its index -> world map.
        ref_affine: the reference grid's index -> world map (same world).
        ref_shape: the reference grid's spatial shape.
        what: how messages name the source.

    Raises:
        LabelProblem: the grids differ, or the source holds foreground outside the reference grid.
    """
    m = np.linalg.solve(ref_affine, affine)
    rot, shift = m[:3, :3], m[:3, 3]
    perm = np.round(rot)
    if (np.abs(rot - perm).max() > _GRID_TOL or not (np.abs(perm).sum(0) == 1).all()
            or not (np.abs(perm).sum(1) == 1).all()):
        raise LabelProblem(f"{what}: its frames have another orientation or pixel spacing than the image series")
    if np.abs(shift - np.round(shift)).max() > _GRID_TOL:
        raise LabelProblem(f"{what}: its frames lie between the image's voxels (not on the image's grid)")
    shift_i = np.round(shift).astype(int)
    order = [int(np.argmax(np.abs(perm[b]))) for b in range(3)]
    moved = np.transpose(array, order + list(range(3, array.ndim)))
    index = [int(perm[b, order[b]]) * np.arange(moved.shape[b]) + shift_i[b] for b in range(3)]
    keep = [(i >= 0) & (i < ref_shape[b]) for b, i in enumerate(index)]
    outside = moved.copy()
    outside[np.ix_(*keep)] = 0
    if outside.any():
        raise LabelProblem(f"{what}: it marks voxels outside the image series")
    out = np.zeros(tuple(ref_shape) + array.shape[3:], dtype=array.dtype)
    out[np.ix_(*[i[k] for i, k in zip(index, keep)])] = moved[np.ix_(*keep)]
    return out


def _combine(masks: dict[int, np.ndarray], shape: tuple[int, ...], header: LabelHeader,
             matcher: ClassMatcher) -> np.ndarray:
    """One label map from per-class masks; where classes overlap, the later class of ``data.classes`` wins."""
    missing = [matcher.classes[v - 1] for v in range(1, len(matcher.classes) + 1) if v not in masks]
    if missing:
        found = ", ".join(repr(n) for n in header.names) or "none"
        raise LabelProblem(f"{header.kind} {header.sop_uid}: no segment matches class {missing[0]!r} "
                           f"(its segments: {found})")
    label = np.zeros(shape, dtype=np.uint8)
    for value in sorted(masks):
        if not masks[value].any():
            raise LabelProblem(f"{header.kind} {header.sop_uid}: the segment of class "
                               f"{matcher.classes[value - 1]!r} is empty")
        label[masks[value]] = value
    return label


def _segment_codes(desc: Any) -> tuple[str, ...]:
    codes = []
    for item in desc.get("SegmentedPropertyTypeCodeSequence", []):
        codes.append(f"{item.get('CodingSchemeDesignator', '')}:{item.get('CodeValue', '')}")
        codes.append(str(item.get("CodeMeaning", "")))
    return tuple(c for c in codes if c and c != ":")


def _check_frame_of_reference(header: LabelHeader, image_frame_of_reference: str, what: str) -> None:
    if header.frame_of_reference_uid and image_frame_of_reference \
            and header.frame_of_reference_uid != image_frame_of_reference:
        raise LabelProblem(f"{what}: its frame of reference is not the image series' one")


def _seg_source_sops(seg: Any) -> set[str]:
    """Every source instance a SEG names: its ReferencedSeriesSequence and each frame's SourceImageSequence."""
    sops = {str(i.ReferencedSOPInstanceUID) for series in seg.get("ReferencedSeriesSequence", [])
            for i in series.get("ReferencedInstanceSequence", [])}
    for frame in seg.get("PerFrameFunctionalGroupsSequence", []):
        for derivation in frame.get("DerivationImageSequence", []):
            sops.update(str(i.ReferencedSOPInstanceUID) for i in derivation.get("SourceImageSequence", []))
    return sops


def seg_label(header: LabelHeader, image: sitk.Image, matcher: ClassMatcher,
              image_sop_uids: set[str], image_frame_of_reference: str) -> np.ndarray:
    """A SEG's classes as one label map on ``image``'s grid, in SimpleITK array order (z, y, x).

    Args:
        header: the SEG's header.
        image: the referenced image series, as read.
        matcher: the configured classes.
        image_sop_uids: the SOPInstanceUIDs of the image series' instances.
        image_frame_of_reference: the image series' FrameOfReferenceUID.

    Raises:
        LabelProblem: why the SEG cannot be used.
    """
    import highdicom as hd

    what = f"SEG {header.sop_uid}"
    _check_frame_of_reference(header, image_frame_of_reference, what)
    try:
        seg = hd.seg.segread(header.path)
    except Exception as exc:  # highdicom raises many types on malformed objects
        raise LabelProblem(f"{what}: not a readable SEG ({type(exc).__name__})") from None
    referenced = _seg_source_sops(seg)
    foreign = sorted(referenced - image_sop_uids)
    if image_sop_uids and foreign:
        raise LabelProblem(f"{what}: its frames' source instances are not in image series {header.series_uid} "
                           f"(e.g. {foreign[0]})")
    by_class: dict[int, list[int]] = {}
    for number in seg.segment_numbers:
        desc = seg.get_segment_description(number)
        value = matcher.value_of(str(desc.segment_label or ""), _segment_codes(desc))
        if value is not None:
            by_class.setdefault(value, []).append(number)
    numbers = [n for ns in by_class.values() for n in ns]
    if not numbers:
        found = ", ".join(repr(n) for n in header.names) or "none"
        raise LabelProblem(f"{what}: no segment matches a class of data.classes (its segments: {found})")
    try:
        volume = seg.get_volume(segment_numbers=numbers, combine_segments=False, dtype=np.float32)
    except Exception as exc:
        raise LabelProblem(f"{what}: its frames do not form a volume ({str(exc).splitlines()[0][:120]})") from None
    ref_shape = image.GetSize()
    placed = place_on_grid(volume.array, volume.affine, image_affine_lps(image), ref_shape, what)
    masks: dict[int, np.ndarray] = {}
    for value, members in by_class.items():
        channels = [numbers.index(n) for n in members]
        # Fractional SEGs come rescaled to [0, 1]: a voxel belongs where the probability/occupancy is at least half.
        mask_xyz = (placed[..., channels] >= 0.5).any(axis=-1)
        masks[value] = np.transpose(mask_xyz, (2, 1, 0))
    return _combine(masks, tuple(reversed(ref_shape)), header, matcher)


#: Voxels (in-plane): how close a voxel centre may be to a contour's outline and count as on it. Writers that
#: trace through boundary voxels' centres (rt-utils, via OpenCV) put their points within ~1e-5 voxel of the
#: centres; writers that draw around voxel edges (plastimatch, contourpy at the 0.5 level) keep their outlines at
#: least 0.35 voxel (a corner cut: 0.5 / sqrt(2)) away from every centre. 0.1 takes the first exactly, never
#: grows the second, and leaves room for writers that round their coordinates to a few hundredths of a voxel.
OUTLINE_TOL = 0.1
#: Slices: how far a contour may sit off its slice's plane (a writer's rounding of z) and still be placed on it.
PLANE_TOL = 0.25


def _outline_pixels(polygon: np.ndarray, shape_yx: tuple[int, int], closed: bool) -> np.ndarray:
    """Pixels (y, x) whose centre lies within :data:`OUTLINE_TOL` of the polygon's outline (its segments)."""
    ends = np.roll(polygon, -1, axis=0) if closed else polygon[1:]
    starts = polygon if closed else polygon[:-1]
    mask = np.zeros(shape_yx, dtype=bool)
    if len(starts) == 0:
        return mask
    # Samples every <= 0.25 voxel along each segment: a centre within OUTLINE_TOL (< 0.25) of a segment is within
    # 0.5 of a sample in each axis, so it is the floor or the ceiling of that sample's coordinates.
    steps = np.maximum(np.ceil(np.abs(ends - starts).max(axis=1) / 0.25).astype(int), 1)
    seg = np.repeat(np.arange(len(starts)), steps + 1)
    t = np.concatenate([np.linspace(0.0, 1.0, s + 1) for s in steps])
    a, b = starts[seg], ends[seg]
    samples = a + t[:, None] * (b - a)
    cand = np.concatenate([np.column_stack([fx(samples[:, 0]), fy(samples[:, 1])])
                           for fx in (np.floor, np.ceil) for fy in (np.floor, np.ceil)])
    a, b = np.tile(a, (4, 1)), np.tile(b, (4, 1))
    d = b - a
    length2 = (d ** 2).sum(axis=1)
    u = np.clip(((cand - a) * d).sum(axis=1) / np.where(length2 > 0, length2, 1.0), 0.0, 1.0)
    near = np.hypot(*(a + u[:, None] * d - cand).T) <= OUTLINE_TOL
    xy = cand[near].astype(int)
    keep = (xy[:, 0] >= 0) & (xy[:, 0] < shape_yx[1]) & (xy[:, 1] >= 0) & (xy[:, 1] < shape_yx[0])
    mask[xy[keep, 1], xy[keep, 0]] = True
    return mask


def _crossing_parity(polygon: np.ndarray, shape_yx: tuple[int, int]) -> np.ndarray:
    """Pixels (y, x) whose centre is inside the polygon by the even-odd rule (a scanline fill along x).

    A centre counts the edges that cross its row (half-open in y, so a vertex is counted once) strictly to its
    left; centres exactly on an edge are the outline's business (:func:`_outline_pixels`).
    """
    mask = np.zeros(shape_yx, dtype=bool)
    y_lo, y_hi = max(int(np.ceil(polygon[:, 1].min())), 0), min(int(np.floor(polygon[:, 1].max())), shape_yx[0] - 1)
    if y_hi < y_lo or len(polygon) < 3:
        return mask
    x1, y1 = polygon[:, 0], polygon[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    rows = np.arange(y_lo, y_hi + 1, dtype=np.float64)[:, None]
    crosses = ((y1 <= rows) & (rows < y2)) | ((y2 <= rows) & (rows < y1))
    r, e = np.nonzero(crosses)
    x = x1[e] + (rows[r, 0] - y1[e]) * (x2[e] - x1[e]) / (y2[e] - y1[e])
    # A crossing at x toggles every centre to its right: the first is floor(x) + 1 (a centre exactly at x is not).
    first = np.clip(np.floor(x).astype(int) + 1, 0, shape_yx[1])
    toggles = np.zeros((y_hi - y_lo + 1, shape_yx[1] + 1), dtype=np.int32)
    np.add.at(toggles, (r, first), 1)
    mask[y_lo:y_hi + 1] = (np.cumsum(toggles, axis=1)[:, :-1] % 2).astype(bool)
    return mask


def _degenerate_pixels(points: np.ndarray, shape_yx: tuple[int, int]) -> np.ndarray:
    """A one- or two-point CLOSED_PLANAR contour: the pixel each point falls in and those along the segment.

    The segment is drawn as a line is (one pixel per step along its longer axis): rt-utils writes a diagonal pair
    of pixels as a two-point contour, and finer steps would take a pixel beside the diagonal that is not in it.
    """
    ends = points if len(points) == 2 else np.vstack([points, points])
    n = max(int(np.ceil(np.abs(ends[1] - ends[0]).max())), 1)
    along = ends[0] + np.linspace(0.0, 1.0, n + 1)[:, None] * (ends[1] - ends[0])
    xy = np.floor(along + 0.5).astype(int)  # the pixel a point falls in: the one whose centre is nearest
    keep = (xy[:, 0] >= 0) & (xy[:, 0] < shape_yx[1]) & (xy[:, 1] >= 0) & (xy[:, 1] < shape_yx[0])
    mask = np.zeros(shape_yx, dtype=bool)
    mask[xy[keep, 1], xy[keep, 0]] = True
    return mask


def _roi_mask(roi_contours: Any, inverse: np.ndarray, size_xyz: tuple[int, int, int], what: str) -> np.ndarray:
    """One ROI's contours as a mask (z, y, x): per slice, the even-odd interior of all its contours together, plus
    every voxel whose centre lies on an outline (:data:`OUTLINE_TOL`), plus the voxels of one- and two-point
    contours. So contours through boundary voxels' centres (rt-utils) and contours around voxel edges
    (plastimatch, contourpy) both give their mask back, and an inner contour is a hole either way.
    """
    shape_yx = (size_xyz[1], size_xyz[0])
    parity = np.zeros(tuple(reversed(size_xyz)), dtype=bool)  # z, y, x
    outline = np.zeros_like(parity)
    for number, contour in enumerate(roi_contours.get("ContourSequence", []), start=1):
        kind = str(contour.get("ContourGeometricType", "CLOSED_PLANAR")).upper()
        points = np.asarray(contour.get("ContourData", []), dtype=np.float64)
        if points.size == 0 or points.size % 3:
            raise LabelProblem(f"{what}: contour {number} has {points.size} coordinates, not x/y/z triples")
        xyz = points.reshape(-1, 3)
        index = (inverse @ np.column_stack([xyz, np.ones(len(xyz))]).T).T[:, :3]
        k = float(np.round(index[:, 2].mean()))
        if np.abs(index[:, 2] - k).max() > PLANE_TOL:
            raise LabelProblem(f"{what}: contour {number} does not lie on a slice plane of the image series "
                               f"(slice positions {index[:, 2].min():.2f} to {index[:, 2].max():.2f})")
        if not 0 <= k < size_xyz[2]:
            raise LabelProblem(f"{what}: contour {number} lies outside the image series' slices (slice {k:.0f} "
                               f"of 0-{size_xyz[2] - 1})")
        if kind != "CLOSED_PLANAR":
            raise LabelProblem(f"{what}: contour {number} on slice {int(k)} is {kind}, not CLOSED_PLANAR "
                               "(an open contour encloses nothing)")
        plane = index[:, :2]
        if len(plane) < 3:
            outline[int(k)] |= _degenerate_pixels(plane, shape_yx)
            continue
        parity[int(k)] ^= _crossing_parity(plane, shape_yx)
        outline[int(k)] |= _outline_pixels(plane, shape_yx, closed=True)
    return parity | outline


def rtstruct_label(header: LabelHeader, image: sitk.Image, matcher: ClassMatcher,
                   image_frame_of_reference: str) -> np.ndarray:
    """An RTSTRUCT's classes as one label map on ``image``'s grid, in SimpleITK array order (z, y, x).

    Args:
        header: the RTSTRUCT's header.
        image: the referenced image series, as read.
        matcher: the configured classes.
        image_frame_of_reference: the image series' FrameOfReferenceUID.

    Raises:
        LabelProblem: why the RTSTRUCT cannot be used.
    """
    what = f"RTSTRUCT {header.sop_uid}"
    _check_frame_of_reference(header, image_frame_of_reference, what)
    try:
        ds = pydicom.dcmread(header.path, force=True)
    except Exception as exc:
        raise LabelProblem(f"{what}: not a readable RTSTRUCT ({type(exc).__name__})") from None
    names = {int(r.ROINumber): str(r.get("ROIName", "") or "") for r in ds.get("StructureSetROISequence", [])}
    inverse = np.linalg.inv(image_affine_lps(image))
    masks: dict[int, np.ndarray] = {}
    for roi in ds.get("ROIContourSequence", []):
        value = matcher.value_of(names.get(int(roi.get("ReferencedROINumber", -1)), ""))
        if value is None:
            continue
        if not roi.get("ContourSequence"):
            raise LabelProblem(f"{what}: ROI {names.get(int(roi.ReferencedROINumber))!r} has no contours")
        roi_mask = _roi_mask(roi, inverse, image.GetSize(), f"{what} ROI {names.get(int(roi.ReferencedROINumber))!r}")
        masks[value] = masks[value] | roi_mask if value in masks else roi_mask
    if not masks:
        found = ", ".join(repr(n) for n in header.names) or "none"
        raise LabelProblem(f"{what}: no ROI matches a class of data.classes (its ROIs: {found})")
    return _combine(masks, tuple(reversed(image.GetSize())), header, matcher)
