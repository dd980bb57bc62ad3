"""The worklist: which predictions a reader should look at first (``unet-pipeline worklist``).

A prediction is one series (or NIfTI case) segmented by one model version, as ``predict`` records it in
``CASE.json`` or ``pacs predict``/``pacs watch`` state it in the DICOM SR beside the SEG. The list is in the
report's order (:func:`~pipeline.quality.records.review_order`): flagged cases first, then the lowest estimated
Dice (the mean over structures, or one structure's with ``structure``), cases without an estimate after those
with one, then by name. So it ranks by whatever estimate the outputs carry.

What goes out is what a reader needs to open the series and nothing else: the case name (the input's file or
folder name, or the series UID on a PACS), the Study and Series Instance UIDs, the estimate, the volumes, the
reasons and the model's name and version; never a patient's name, ID or birth date, never a path.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pipeline.data import write_text_atomic
from pipeline.errors import ConfigError, InputDataError
from pipeline.quality.records import read_record, review_order


@dataclass(frozen=True)
class WorkItem:
    """One prediction on the worklist.

    Args:
        case: the case's name (a ``predict`` output's case, or the series UID for a PACS).
        study_instance_uid: the study (``None``: a NIfTI input).
        series_instance_uid: the segmented image series (``None``: a NIfTI input).
        model_name: the model that predicted it.
        model_version: its version.
        flagged: the prediction's own review flag (CASE.json's; on a PACS: the SR withholds the estimate).
        reasons: why to review it, the record's reasons first.
        estimates: structure -> estimated Dice (``None``: no estimate).
        volumes_ml: structure -> predicted volume in mL.
        when: when the prediction was made, POSIX seconds (``None``: unknown); the newest of a series counts.
    """

    case: str
    study_instance_uid: str | None
    series_instance_uid: str | None
    model_name: str
    model_version: str
    flagged: bool
    reasons: tuple[str, ...]
    estimates: dict[str, float | None]
    volumes_ml: dict[str, float]
    when: float | None = None

    def estimate(self, structure: str | None = None) -> float | None:
        """The estimated Dice the list ranks by: the structure's, or the mean over all structures (``None`` when any
        structure has none, as ``CASE.json``'s ``estimated_mean_dice``).

        Args:
            structure: a structure's name, or ``None`` for the case.
        """
        if structure is not None:
            return _finite(self.estimates.get(structure))
        known = [_finite(e) for e in self.estimates.values()]
        if not known or any(e is None for e in known):
            return None
        return float(sum(known) / len(known))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Worklist:
    """The ranked predictions, most urgent first.

    Args:
        items: the predictions, in order.
        structure: the structure they are ranked by (``None``: the case's mean).
        viewer_url: the viewer's root URL, for a link per study (``None``: no links).
        total: how many predictions were ranked before ``limit`` cut the list.
        structures: every structure of the predictions, in first-seen order (the CSV's columns).
    """

    items: list[WorkItem]
    structure: str | None = None
    viewer_url: str | None = None
    total: int = 0
    structures: list[str] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per item, in order: the JSON items (``--json``) and the CSV rows."""
        out = []
        for rank, item in enumerate(self.items, start=1):
            out.append({
                "rank": rank, "case": item.case, "study_instance_uid": item.study_instance_uid,
                "series_instance_uid": item.series_instance_uid, "structure": self.structure,
                "estimated_dice": item.estimate(self.structure), "flagged": item.flagged,
                "reasons": list(item.reasons), "model": {"name": item.model_name, "version": item.model_version},
                "volumes_ml": dict(item.volumes_ml), "estimates": dict(item.estimates),
                "viewer_url": viewer_link(self.viewer_url, item.study_instance_uid),
            })
        return out

    def to_json(self) -> str:
        """``{"items": [...]}`` (see :meth:`rows`), as ``--json`` prints it."""
        return json.dumps({"items": self.rows()}, indent=1)

    def write_csv(self, path: Path) -> Path:
        """Write the list as CSV, atomically: one row per item, a volume and an estimate column per structure.

        Args:
            path: the target file (its folder is created).

        Raises:
            InputDataError: the file cannot be written.
        """
        columns = ["rank", "case", "study_instance_uid", "series_instance_uid", "structure", "estimated_dice",
                   "flagged", "model", "model_version"]
        columns += [f"{s} volume_ml" for s in self.structures] + [f"{s} estimated_dice" for s in self.structures]
        columns += ["reasons", "viewer_url"]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in self.rows():
            flat = {**{k: row[k] for k in columns if k in row}, "model": row["model"]["name"],
                    "model_version": row["model"]["version"], "flagged": "yes" if row["flagged"] else "no",
                    "reasons": "; ".join(row["reasons"])}
            flat.update({f"{s} volume_ml": row["volumes_ml"].get(s) for s in self.structures})
            flat.update({f"{s} estimated_dice": row["estimates"].get(s) for s in self.structures})
            writer.writerow({k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v)
                             for k, v in flat.items()})
        try:
            write_text_atomic(Path(path), buffer.getvalue())
        except OSError as error:
            raise InputDataError(path, f"cannot be written ({error.strerror or type(error).__name__})") from None
        return Path(path)

    def publish(self, out: Path | None = None, as_json: bool = False) -> tuple[list[str], str | None]:
        """Write the CSV when asked, and say what ``worklist`` prints: stdout's lines and one line for stderr.

        ``--json``: the JSON; ``--out`` alone: one line naming the file; else the table on stdout and the count on
        stderr.

        Args:
            out: the CSV to write (``None``: none).
            as_json: print the JSON.
        """
        if out is not None:
            self.write_csv(out)
        shown = f"{len(self.items)} of {self.total}" if len(self.items) < self.total else f"{self.total}"
        if as_json:
            return [self.to_json()], None
        if out is not None:
            return [f"{out}: {shown} series, most urgent first"], None
        return self.lines(), f"{shown} series to review, most urgent first"

    def lines(self) -> list[str]:
        """The list as a table for the terminal, one line per item."""
        out = []
        for row in self.rows():
            dice = "-" if row["estimated_dice"] is None else f"{row['estimated_dice']:.3f}"
            text = (f"{row['rank']:>3}  {dice:>5}  {'flagged' if row['flagged'] else '       '}  {row['case']}  "
                    f"{row['model']['name']} v{row['model']['version']}")
            if row["reasons"]:
                text += "  " + "; ".join(row["reasons"])
            if row["viewer_url"]:
                text += f"  {row['viewer_url']}"
            out.append(text)
        return out


def viewer_link(viewer_url: str | None, study_uid: str | None) -> str | None:
    """The link that opens a study in OHIF: ``VIEWER/viewer?StudyInstanceUIDs=UID`` (``None`` without both).

    Args:
        viewer_url: the viewer's root, e.g. ``https://ohif.example.org`` (``pacs.viewer_url``).
        study_uid: the StudyInstanceUID.
    """
    if not viewer_url or not study_uid:
        return None
    return f"{viewer_url.rstrip('/')}/viewer?StudyInstanceUIDs={quote(study_uid, safe='.')}"


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def dicom_time(value: str) -> float | None:
    """``YYYYMMDD[HHMMSS[.ffffff]]`` (a DICOM date and time joined) as POSIX seconds, read as local time.

    Args:
        value: the joined date and time ("" or unreadable: ``None``).
    """
    digits, _, fraction = value.strip().partition(".")
    try:
        moment = datetime.strptime(digits.ljust(14, "0")[:14], "%Y%m%d%H%M%S")
        return moment.timestamp() + (float(f"0.{fraction}") if fraction.isdigit() else 0.0)
    except ValueError:
        return None


def _seg_uids(seg: Path) -> tuple[str | None, str | None]:
    """The study and the referenced image series of a SEG ``predict`` wrote (``None``, ``None``: unreadable)."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(seg), stop_before_pixels=True)
        return str(ds.StudyInstanceUID), str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
    except Exception:  # a missing or damaged SEG: the case is still listed, without UIDs
        return None, None


def folder_items(folder: Path) -> list[WorkItem]:
    """The predictions of a ``predict`` output folder, from its case records (``CASE.json``).

    A case predicted from a DICOM series gets the Study and Series Instance UIDs of the SEG beside its record.

    Args:
        folder: the ``predict --out`` folder.

    Raises:
        InputDataError: the folder does not exist or holds no case records.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputDataError(folder, "is not a folder (a worklist source is a predict output folder or a "
                                     "DICOMweb URL)")
    items = []
    for path in sorted(folder.glob("*.json")):
        record = read_record(path)
        if not _is_record(record):
            continue
        study, series = _seg_uids(folder / record["files"]["seg"]) if (record.get("files") or {}).get("seg") else (
            None, None)
        labels = record["labels"]
        items.append(WorkItem(
            case=str(record["case"]), study_instance_uid=study, series_instance_uid=series,
            model_name=str(record["model"].get("name", "")), model_version=str(record["model"].get("version", "")),
            flagged=bool(record.get("flagged")), reasons=tuple(str(r) for r in record.get("reasons") or []),
            estimates={n: _finite(e.get("estimated_dice")) for n, e in labels.items()},
            volumes_ml={n: float(e.get("volume_ml") or 0.0) for n, e in labels.items()},
            # The record's write time: the newest prediction of a series counts, and versions that are not numbers
            # are ordered by it.
            when=path.stat().st_mtime,
        ))
    if not items:
        raise InputDataError(folder, "is not a predict output folder: it holds no case records (CASE.json)")
    return items


def _is_record(record: Any) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("case"), str) and isinstance(record.get("labels"), dict)
            and isinstance(record.get("model"), dict)
            and all(isinstance(e, dict) for e in record["labels"].values()))


def _version_key(version: str) -> tuple[int, float | str]:
    return (0, float(version)) if version.replace(".", "", 1).isdigit() else (1, version)


def newest_versions(items: Iterable[WorkItem]) -> dict[str, str]:
    """Each model's newest version among ``items``: the highest number when every version is one (registry
    versions), else the version of the latest prediction (run ids and checkpoint names say nothing of age).

    Args:
        items: the predictions.
    """
    by_model: dict[str, dict[str, float]] = {}
    for item in items:
        latest = by_model.setdefault(item.model_name, {})
        when = item.when if item.when is not None else -math.inf
        latest[item.model_version] = max(latest.get(item.model_version, -math.inf), when)
    newest = {}
    for model, versions in by_model.items():
        if all(_version_key(v)[0] == 0 for v in versions):
            newest[model] = max(versions, key=lambda v: float(v))
        else:
            newest[model] = max(versions, key=lambda v: (versions[v], v))
    return newest


def rank(items: Sequence[WorkItem], model: str | None = None, structure: str | None = None, limit: int | None = None,
         viewer_url: str | None = None) -> Worklist:
    """The worklist: one model's predictions, the newest per series, in the report's order.

    A prediction by an older version of the model than the newest among ``items`` says so in its reasons (it
    keeps its place: the estimate ranks it).

    Args:
        items: the predictions of every source.
        model: the model whose predictions to list (``None``: the only one present).
        structure: rank by this structure's estimated Dice (``None``: the case's mean).
        limit: keep the first ``limit`` items.
        viewer_url: the viewer's root, for a link per study.

    Raises:
        ConfigError: no prediction of ``model``; several models and no ``model``; an unknown ``structure``;
            ``limit`` below 1.
    """
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    names = sorted({i.model_name for i in items})
    if model is not None:
        chosen = [i for i in items if i.model_name == model]
        if not chosen:
            raise ConfigError(f"worklist: no prediction of model {model!r} in the sources (found: "
                              f"{', '.join(names) or 'none'})")
    elif len(names) > 1:
        raise ConfigError(f"worklist: the sources hold predictions of {len(names)} models ({', '.join(names)}); "
                          "choose one with --model NAME")
    else:
        chosen = list(items)
    # One line per series: its newest prediction (a re-run or a newer version replaces the older one).
    latest: dict[tuple[str, ...], WorkItem] = {}
    for item in chosen:
        key = ("series", item.study_instance_uid or "", item.series_instance_uid) if item.series_instance_uid else (
            "case", item.case, str(id(item)))
        kept = latest.get(key)
        if kept is None or (item.when or -math.inf) > (kept.when or -math.inf):
            latest[key] = item
    chosen = list(latest.values())
    structures: list[str] = []
    for item in chosen:
        structures += [s for s in item.estimates if s not in structures]
    if structure is not None and structure not in structures:
        raise ConfigError(f"--structure {structure!r}: not a structure of these predictions (they have: "
                          f"{', '.join(structures) or 'none'})")
    newest = newest_versions(chosen)
    marked = []
    for item in chosen:
        if item.model_version != newest[item.model_name]:
            item = replace(item, reasons=(*item.reasons, f"predicted by version {item.model_version} of "
                                                         f"{item.model_name}; version {newest[item.model_name]} "
                                                         "is the newest in these sources"))
        marked.append(item)
    if structure is not None:
        # A case that lacks the structure's label altogether has no estimate of it: after those that have one.
        marked = [i if structure in i.estimates else replace(i, estimates={**i.estimates, structure: None})
                  for i in marked]

    def order(item: WorkItem) -> tuple:
        return review_order({"flagged": item.flagged, "estimated_mean_dice": item.estimate(structure),
                             "case": item.case})

    ordered = sorted(marked, key=order)
    return Worklist(ordered[:limit] if limit else ordered, structure, viewer_url, len(ordered), structures)
