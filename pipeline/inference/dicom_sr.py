"""DICOM SR (highdicom, TID 1500 Measurement Report) of a DICOM SEG's segment volumes and estimated Dice.

The report belongs in the source study: it references the SEG (one measurement group per
segment, by segment number) and the series the SEG was predicted from. Volumes are in mL;
the estimated Dice, having no standard concept, is a private code (``99UNETPIPE``). Where
the estimate was withheld (an input unlike the training data), the group states that
instead of a Dice: a qualitative evaluation of the same concept, valued with a private code
whose meaning says why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data import Staged, save_file
from pipeline.errors import InputDataError
from pipeline.inference.dicom_seg import Algorithm, _quiet_dicom_libraries, _with_type2_attributes

#: Coding scheme designator of this package's private codes (declared in the SR's coding schemes).
PRIVATE_SCHEME = "99UNETPIPE"
_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass(frozen=True)
class SegmentMeasurement:
    """What the report states about one segment of the SEG.

    Args:
        name: the segment's label in the SEG (its SegmentLabel).
        volume_ml: the segment's volume in mL.
        estimated_dice: the Dice similarity coefficient estimated for it; ``None``: not estimated (no Dice
            measurement is written).
        estimate_withheld: the estimate was withheld on purpose (the input is unlike the training data):
            the group says so instead of giving a Dice.
    """

    name: str
    volume_ml: float
    estimated_dice: float | None = None
    estimate_withheld: bool = False


@dataclass(frozen=True)
class ReviewFlag:
    """Whether the prediction should be reviewed, and why (the case record's ``flagged`` and ``reasons``).

    Args:
        flagged: the case is flagged for a reader's review.
        reasons: the record's reasons, in its words (structure names and figures: never a header value or a path).
    """

    flagged: bool
    reasons: tuple[str, ...] = ()


def review_of(record: Mapping[str, Any]) -> ReviewFlag:
    """The review flag and reasons of a case record (``CASE.json``'s content).

    Args:
        record: the case record.
    """
    return ReviewFlag(bool(record.get("flagged")), tuple(str(r) for r in record.get("reasons") or []))


def measurements_of(record: Mapping[str, Any]) -> list[SegmentMeasurement]:
    """The SR's measurements of a case record: each label's volume and estimated Dice.

    Args:
        record: a case record (``CASE.json``'s content).
    """
    withheld = bool(record.get("estimate_withheld"))
    return [SegmentMeasurement(name, e["volume_ml"], e["estimated_dice"], withheld and e["estimated_dice"] is None)
            for name, e in record["labels"].items()]


def write_dicom_sr(
    seg_path: Path, source_files: Sequence[Path], measurements: Sequence[SegmentMeasurement], algorithm: Algorithm,
    path: Path, staged: Staged | None = None, review: ReviewFlag | None = None,
) -> Path:
    """Write a Comprehensive 3D SR (TID 1500) of per-segment volumes and estimated Dice, atomically.

    Each measurement is matched to the SEG's segment of the same label; its group references
    that segment (SEG SOP instance and segment number) and the source series, and is tracked
    by the label. Patient and study are copied from the sources; the SEG and every source
    instance are listed as evidence. The device observer is the algorithm. The case's review
    flag is a qualitative evaluation of the first group (private code ``REVIEW``: ``Review
    recommended`` or ``No review flag``), each reason a TEXT item (``REVIEW-REASON``) beside it.

    Args:
        seg_path: the DICOM SEG the measurements are of (as :func:`write_dicom_seg` writes it).
        source_files: the files of the series the SEG was predicted from.
        measurements: one per reported segment, each naming a segment of the SEG.
        algorithm: the model's identity.
        path: the target ``.dcm``.
        staged: write as part of these staged files (committed together); default: on its own.
        review: the case's review flag and reasons (:func:`review_of`); ``None``: the report states none.

    Raises:
        InputDataError: a file cannot be read, the SEG is not a SEG of the source series, a
            measurement names no segment of it (or one of several) or is not a finite number.
    """
    if not source_files:
        raise InputDataError(seg_path, "no source series files were given for the DICOM SR")
    folder = Path(source_files[0]).parent
    with _quiet_dicom_libraries():
        seg = _read_header(Path(seg_path))
        sources = [_with_type2_attributes(_read_header(Path(f))) for f in source_files]
        groups = _matched_segments(seg, Path(seg_path), sources, measurements)
        try:
            sr = _build_sr(seg, sources, groups, algorithm, review)
            save_file(path, staged, ".dcm", sr.save_as)
        except (ValueError, TypeError, AttributeError, KeyError) as error:
            # highdicom's messages may quote header values (patient data): only the kind of error is shown.
            raise InputDataError(folder, f"cannot be referenced by a DICOM SR (highdicom raised "
                                         f"{type(error).__name__})") from None
    return path


def read_dicom_sr(path: Path) -> dict[str, dict[str, float | None]]:
    """The per-segment measurements of a report :func:`write_dicom_sr` wrote, read with highdicom.

    Args:
        path: the SR file.

    Returns:
        Segment label -> ``{"volume_ml": ..., "estimated_dice": ..., "estimate_withheld": ...}``; the Dice
        is ``None`` where the report has none, and ``estimate_withheld`` the reason the report gives
        for withholding it (``None``: it gives none).

    Raises:
        InputDataError: the file cannot be read or is not such a measurement report.
    """
    import highdicom as hd
    from pydicom.errors import InvalidDicomError
    from pydicom.sr.codedict import codes

    with _quiet_dicom_libraries():
        try:
            report = hd.sr.MeasurementReport.from_sequence(hd.sr.srread(path).content)
            groups = report.get_volumetric_roi_measurement_groups()
            result: dict[str, dict[str, float | None]] = {}
            for group in groups:
                label = group.tracking_identifier
                volume = group.get_measurements(name=codes.SCT.Volume)
                dice = group.get_measurements(name=_dice_concept())
                if label is None or label in result or len(volume) != 1 or len(dice) > 1:
                    raise InputDataError(path, "is not a segment measurement report (a measurement group lacks "
                                               "its label or volume, or repeats one)")
                if volume[0].unit.value.lower() != "ml":
                    raise InputDataError(path, "states a segment volume in a unit other than mL")
                withheld = [e.value.meaning for e in group.get_qualitative_evaluations(name=_dice_concept())]
                result[label] = {"volume_ml": volume[0].value, "estimated_dice": dice[0].value if dice else None,
                                 "estimate_withheld": withheld[0] if withheld else None}
        except FileNotFoundError:
            raise InputDataError(path, "does not exist") from None
        except OSError as error:
            raise InputDataError(path, f"cannot be read ({error.strerror or type(error).__name__})") from None
        except (InvalidDicomError, RuntimeError, ValueError, TypeError, AttributeError, KeyError, IndexError) as error:
            # srread raises RuntimeError for a SOP class that is no SR it knows (e.g. a SEG).
            raise InputDataError(path, f"is not a DICOM SR measurement report (highdicom raised "
                                       f"{type(error).__name__})") from None
    return result


def _read_header(path: Path) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except FileNotFoundError:
        raise InputDataError(path, "does not exist") from None
    except OSError as error:
        raise InputDataError(path, f"cannot be read ({error.strerror or type(error).__name__})") from None
    except InvalidDicomError:
        raise InputDataError(path, "is not a DICOM file") from None


def _matched_segments(seg: Any, seg_path: Path, sources: Sequence[Any],
                     measurements: Sequence[SegmentMeasurement]) -> list[tuple[SegmentMeasurement, Any]]:
    """Each measurement with the SEG's segment item it names, after checking the SEG belongs to the sources."""
    if seg.get("SOPClassUID") != _SEGMENTATION_STORAGE:
        raise InputDataError(seg_path, "is not a DICOM SEG")
    series = {str(d.get("SeriesInstanceUID", "")) for d in sources}
    referenced = {str(r.get("SeriesInstanceUID", "")) for r in seg.get("ReferencedSeriesSequence", [])}
    if len(series) != 1 or not series <= referenced:
        raise InputDataError(seg_path, "does not reference the given source series")
    segments: dict[str, list[Any]] = {}
    for item in seg.get("SegmentSequence", []):
        segments.setdefault(str(item.get("SegmentLabel", "")), []).append(item)
    names = [m.name for m in measurements]
    pairs = []
    for m in measurements:
        # Segment labels are the model's label names, never patient data: they may be quoted.
        found = segments.get(m.name, [])
        if len(found) != 1 or names.count(m.name) != 1:
            problem = "has no segment" if not found else "has several segments" if len(found) > 1 else "is measured twice"
            raise InputDataError(seg_path, f"{problem} named {m.name!r}")
        dice_ok = m.estimated_dice is None or (math.isfinite(m.estimated_dice) and 0.0 <= m.estimated_dice <= 1.0)
        if not (math.isfinite(m.volume_ml) and m.volume_ml >= 0.0 and dice_ok):
            raise InputDataError(seg_path, f"segment {m.name!r}: volume or estimated Dice out of range")
        pairs.append((m, found[0]))
    return pairs


def _dice_concept() -> Any:
    import highdicom as hd

    return hd.sr.CodedConcept(value="EST-DICE", scheme_designator=PRIVATE_SCHEME,
                              meaning="Estimated Dice similarity coefficient")


def _withheld_concept() -> Any:
    import highdicom as hd

    # CodeMeaning is a LO: at most 64 characters.
    return hd.sr.CodedConcept(value="EST-WITHHELD", scheme_designator=PRIVATE_SCHEME,
                              meaning="Withheld: input unlike the training data")


def _review_concept() -> Any:
    import highdicom as hd

    return hd.sr.CodedConcept(value="REVIEW", scheme_designator=PRIVATE_SCHEME, meaning="Review of the prediction")


def _review_value(flagged: bool) -> Any:
    import highdicom as hd

    return hd.sr.CodedConcept(value="REVIEW-YES" if flagged else "REVIEW-NO", scheme_designator=PRIVATE_SCHEME,
                              meaning="Review recommended" if flagged else "No review flag")


def _reason_concept() -> Any:
    import highdicom as hd

    return hd.sr.CodedConcept(value="REVIEW-REASON", scheme_designator=PRIVATE_SCHEME,
                              meaning="Reason for review")


def _build_sr(seg: Any, sources: Sequence[Any], groups: Sequence[tuple[SegmentMeasurement, Any]],
              algorithm: Algorithm, review: ReviewFlag | None = None) -> Any:
    import highdicom as hd
    from highdicom.coding_schemes import CodingSchemeIdentificationItem
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    algorithm_id = hd.sr.AlgorithmIdentification(name=algorithm.name[:64], version=algorithm.version[:64])
    source_series = hd.sr.SourceSeriesForSegmentation(str(sources[0].SeriesInstanceUID))
    millilitre = hd.sr.CodedConcept(value="ml", scheme_designator="UCUM", meaning="milliliter")
    rois = []
    for m, item in groups:
        measured = [hd.sr.Measurement(name=codes.SCT.Volume, value=float(m.volume_ml), unit=millilitre)]
        if m.estimated_dice is not None:
            measured.append(hd.sr.Measurement(name=_dice_concept(), value=float(m.estimated_dice),
                                              unit=codes.UCUM.NoUnits))
        withheld = [hd.sr.QualitativeEvaluation(name=_dice_concept(), value=_withheld_concept())
                    ] if m.estimate_withheld and m.estimated_dice is None else []
        if review is not None and not rois:  # the case's flag, once: on the first group
            withheld.append(hd.sr.QualitativeEvaluation(name=_review_concept(), value=_review_value(review.flagged)))
        property_type = item.get("SegmentedPropertyTypeCodeSequence")
        rois.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=m.name),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=str(seg.SOPInstanceUID),
                segment_number=int(item.SegmentNumber), source_series=source_series,
            ),
            finding_type=hd.sr.CodedConcept.from_dataset(property_type[0]) if property_type else codes.SCT.Tissue,
            algorithm_id=algorithm_id, measurements=measured, qualitative_evaluations=withheld or None,
        ))
        if review is not None and len(rois) == 1:
            # TID 1500's groups take qualitative evaluations as codes; a reason is free text, so it is a TEXT
            # item of the group (readers that do not know the private code skip it).
            rois[0][0].ContentSequence.extend(
                hd.sr.TextContentItem(name=_reason_concept(), value=reason[:1024],
                                      relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
                for reason in review.reasons)
    # The same algorithm is the same device in every report: its UID is derived from its identity.
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=["unet-pipeline", algorithm.name, algorithm.version]),
        name=algorithm.name[:64], manufacturer_name="unet-pipeline", model_name=algorithm.name[:64],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device, observer_identifying_attributes=device)),
        procedure_reported=codes.cid100.ImagingProcedure, imaging_measurements=rois,
    )
    scheme = CodingSchemeIdentificationItem(designator=PRIVATE_SCHEME, name="unet-pipeline private codes",
                                            responsible_organization="unet-pipeline")
    return hd.sr.Comprehensive3DSR(
        evidence=[*sources, seg], content=report, series_instance_uid=hd.UID(), series_number=_series_number(seg),
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="unet-pipeline",
        # An algorithm's output no one has reviewed: complete, but neither verified nor final.
        is_complete=True, is_final=False, is_verified=False, coding_schemes=[scheme],
        # Never the SEG's description (a PACS pass recognises its SEGs by it), even when that is 64 characters.
        series_description=f"{algorithm.series_description[:61]} SR", manufacturer_model_name=algorithm.name[:64],
        software_versions=algorithm.software_version[:64], device_serial_number="0",
    )


def _series_number(seg: Any) -> int:
    """The SEG's series number + 1 (the SEG's own scheme: the source's + 1000, + 1 for its report)."""
    try:
        return int(seg.SeriesNumber) + 1
    except (AttributeError, TypeError, ValueError):
        return 1001


#: The Manufacturer of every SR this package writes: how its reports are told apart from other SRs in a study.
SR_MANUFACTURER = "unet-pipeline"


@dataclass(frozen=True)
class PredictionReport:
    """What one of this package's SRs says about a prediction: whose, of which series, when, and the measurements.

    Args:
        study_uid: the StudyInstanceUID.
        series_uid: the SeriesInstanceUID of the image series that was segmented (the source series).
        model_name: the algorithm's name (the registered model's).
        model_version: the algorithm's version.
        when: ``YYYYMMDDHHMMSS[.ffffff]`` from the SR's ContentDate and ContentTime ("" when absent).
        segments: segment label -> measurements, as :func:`read_dicom_sr` gives them.
        review: the case's review flag and reasons; ``None`` in a report that states none (written before they
            were).
    """

    study_uid: str
    series_uid: str
    model_name: str
    model_version: str
    when: str
    segments: dict[str, dict[str, Any]]
    review: ReviewFlag | None = None


def _content_items(items: Any) -> Any:
    """Every content item of an SR content tree, depth first."""
    for item in items or []:
        yield item
        yield from _content_items(item.get("ContentSequence"))


def read_prediction_report(path: Path) -> PredictionReport | None:
    """The prediction a report :func:`write_dicom_sr` wrote describes (``None``: an SR this package did not write).

    The model's name and version are the Algorithm Name and Version (DCM 111001, 111003) of its measurement groups,
    the segmented series their Source Series for Segmentation (DCM 121232). No header value other than UIDs and the
    model's identity is read.

    Args:
        path: a DICOM file.

    Raises:
        InputDataError: the file cannot be read, or is one of this package's SRs that lacks what it always states.
    """
    header = _read_header(Path(path))
    if str(header.get("Manufacturer", "") or "").strip() != SR_MANUFACTURER or header.get("Modality") != "SR":
        return None
    import pydicom

    with _quiet_dicom_libraries():
        dataset = pydicom.dcmread(str(path), force=True)
    found: dict[str, set[str]] = {"111001": set(), "111003": set(), "121232": set()}
    flags: list[bool] = []
    reasons: list[str] = []
    for item in _content_items(dataset.get("ContentSequence")):
        names = item.get("ConceptNameCodeSequence") or []
        code = str(names[0].get("CodeValue", "")) if names else ""
        scheme = names[0].get("CodingSchemeDesignator") if names else None
        if code in found and scheme == "DCM":
            found[code].add(str(item.get("TextValue", "") or item.get("UID", "") or "").strip())
        elif scheme == PRIVATE_SCHEME and code == "REVIEW" and item.get("ConceptCodeSequence"):
            flags.append(str(item.ConceptCodeSequence[0].get("CodeValue", "")) == "REVIEW-YES")
        elif scheme == PRIVATE_SCHEME and code == "REVIEW-REASON":
            reasons.append(str(item.get("TextValue", "") or ""))
    if any(len(values) != 1 or not next(iter(values)) for values in found.values()):
        raise InputDataError(path, "is an SR of unet-pipeline without one algorithm name, version and source series")
    date = str(header.get("ContentDate", "") or "").strip()
    when = date + str(header.get("ContentTime", "") or "").strip().ljust(6, "0") if date else ""
    review = ReviewFlag(any(flags), tuple(reasons)) if flags else None
    return PredictionReport(str(header.get("StudyInstanceUID", "") or ""), next(iter(found["121232"])),
                            next(iter(found["111001"])), next(iter(found["111003"])), when, read_dicom_sr(Path(path)),
                            review)
