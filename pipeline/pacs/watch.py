"""The bookkeeping of a scheduled PACS pass (``unet-pipeline pacs watch``): which studies to segment, and what happened.

A pass lists the studies, skips those already done (in the ledger, or holding a SEG of this model version
on the PACS, so losing the ledger never duplicates a SEG), selects the series and hands each remaining
study to a callback that segments it and stores the SEG. One study's failure is recorded and the pass goes
on; a PACS that is down or refuses us stops the pass, since every other study would fail the same way.

The ledger holds UIDs, times and our own one-line reasons only: no header value ever goes into it.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path

from pipeline.data import write_text_atomic
from pipeline.errors import InputDataError, PacsAuthError, PacsUnavailableError, PartialFailureError, user_error
from pipeline.pacs.client import PacsClient
from pipeline.pacs.series import SeriesRules, SeriesSummary, matching_series, select_series

logger = logging.getLogger(__name__)

DONE, FAILED, IN_PROGRESS = "done", "failed", "in_progress"
LEDGER_VERSION = 1
NO_MATCHING_SERIES = "no matching series"
_REASON_MAX = 300


@dataclass
class LedgerEntry:
    """What the ledger knows of one (study, model tag).

    Args:
        status: ``done``, ``failed`` or ``in_progress`` (a pass that stopped half-way; redone next time).
        time: when the status was set (UTC, ISO 8601).
        series_uid: the series segmented, when known.
        seg_sop_instance_uid: the stored SEG's SOPInstanceUID (``done`` only).
        reason: a one-line reason (``failed`` only; also how a ``done`` was found).
        attempts: failed attempts so far (reset when done).
    """

    status: str
    time: str
    series_uid: str | None = None
    seg_sop_instance_uid: str | None = None
    reason: str | None = None
    attempts: int = 0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class WatchLedger:
    """The record of past passes, in ``work_dir/pacs/ledger.json``, rewritten atomically on every change.

    Args:
        work_dir: the pipeline's work directory.
    """

    def __init__(self, work_dir: Path) -> None:
        self.path = Path(work_dir) / "pacs" / "ledger.json"
        self._entries: dict[str, dict[str, LedgerEntry]] = self._load()

    def _load(self) -> dict[str, dict[str, LedgerEntry]]:
        if not self.path.is_file():
            return {}
        fix = "move it away to start over (studies that hold a SEG of the model on the PACS are still skipped)"
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") != LEDGER_VERSION:
                raise InputDataError(self.path, f"ledger version {data.get('version')!r}, expected {LEDGER_VERSION}; {fix}")
            return {study: {tag: LedgerEntry(**entry) for tag, entry in tags.items()}
                    for study, tags in data["studies"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputDataError(self.path, f"not a valid watch ledger ({type(exc).__name__}); {fix}") from None

    def _save(self) -> None:
        data = {"version": LEDGER_VERSION,
                "studies": {study: {tag: asdict(entry) for tag, entry in tags.items()}
                            for study, tags in sorted(self._entries.items())}}
        write_text_atomic(self.path, json.dumps(data, indent=1))

    def get(self, study_uid: str, model_tag: str) -> LedgerEntry | None:
        """The entry of ``(study_uid, model_tag)``, or ``None``.

        Args:
            study_uid: the StudyInstanceUID.
            model_tag: the model's tag (:func:`pipeline.pacs.client.model_tag`).
        """
        return self._entries.get(study_uid, {}).get(model_tag)

    def _set(self, study_uid: str, model_tag: str, entry: LedgerEntry) -> LedgerEntry:
        self._entries.setdefault(study_uid, {})[model_tag] = entry
        self._save()
        return entry

    def mark_in_progress(self, study_uid: str, model_tag: str, series_uid: str) -> LedgerEntry:
        """Record that the study is being processed; left behind by an interrupted pass, it is redone next time.

        Args:
            study_uid: the StudyInstanceUID.
            model_tag: the model's tag.
            series_uid: the series being segmented.
        """
        previous = self.get(study_uid, model_tag)
        attempts = previous.attempts if previous else 0
        return self._set(study_uid, model_tag, LedgerEntry(IN_PROGRESS, _now(), series_uid, attempts=attempts))

    def mark_done(self, study_uid: str, model_tag: str, seg_sop_instance_uid: str, series_uid: str | None = None,
                  reason: str | None = None) -> LedgerEntry:
        """Record the study's SEG.

        Args:
            study_uid: the StudyInstanceUID.
            model_tag: the model's tag.
            seg_sop_instance_uid: the stored SEG's SOPInstanceUID.
            series_uid: the series segmented, when known.
            reason: how it was found, when not by this pipeline's pass (e.g. already on the PACS).
        """
        return self._set(study_uid, model_tag, LedgerEntry(DONE, _now(), series_uid, seg_sop_instance_uid, reason))

    def mark_failed(self, study_uid: str, model_tag: str, reason: str, series_uid: str | None = None) -> LedgerEntry:
        """Record a failure and count the attempt.

        Args:
            study_uid: the StudyInstanceUID.
            model_tag: the model's tag.
            reason: one line, without header values.
            series_uid: the series selected, when known.
        """
        previous = self.get(study_uid, model_tag)
        attempts = (previous.attempts if previous else 0) + 1
        one_line = " ".join(reason.split())[:_REASON_MAX]
        return self._set(study_uid, model_tag, LedgerEntry(FAILED, _now(), series_uid, reason=one_line, attempts=attempts))


@dataclass
class WatchReport:
    """What one pass did.

    Args:
        processed: study UID -> the SOPInstanceUID of the SEG stored by this pass.
        skipped: study UID -> why it was not processed (already done, no matching series...); not failures.
        failed: study UID -> one-line reason.
    """

    processed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line of counts."""
        return f"{len(self.processed)} processed, {len(self.skipped)} skipped, {len(self.failed)} failed"

    def lines(self) -> list[str]:
        """One line per study (processed, then failed, then skipped), then the summary."""
        return ([f"processed {study}: SEG {seg}" for study, seg in self.processed.items()]
                + [f"FAILED {study}: {reason}" for study, reason in self.failed.items()]
                + [f"skipped {study}: {reason}" for study, reason in self.skipped.items()]
                + [self.summary()])

    def raise_for_failures(self) -> None:
        """Raise :class:`PartialFailureError` (exit 10) when a study failed; call after printing :meth:`lines`."""
        if self.failed:
            total = len(self.processed) + len(self.failed)
            study, reason = next(iter(self.failed.items()))
            more = f" (and {len(self.failed) - 1} more)" if len(self.failed) > 1 else ""
            raise PartialFailureError(f"PACS watch: {len(self.failed)} of {total} studies failed; {study}: {reason}{more}")


def _reason(exc: BaseException) -> str:
    """One line about a failure that holds no header value."""
    inner = user_error(exc)
    if inner is not None:
        return " ".join(str(inner).split())[:_REASON_MAX] or type(inner).__name__
    # Another exception's text may quote anything, a patient name included: give its type and place only.
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"unexpected {type(exc).__name__}{where}"


def run_watch_pass(
    client: PacsClient,
    model_tag: str,
    rules: SeriesRules,
    since: date | None,
    process: Callable[[str, SeriesSummary], str],
    ledger: WatchLedger,
    max_attempts: int = 3,
) -> WatchReport:
    """One pass over the PACS: segment every study that has no SEG of this model version yet.

    A study without a matching series is skipped (``no matching series``); one with several fails, since only
    narrower rules can settle it. Failed studies are retried by later passes, up to ``max_attempts``.

    Args:
        client: the PACS.
        model_tag: the tag the model's SEGs carry as SeriesDescription (:func:`pipeline.pacs.client.model_tag`).
        rules: how to select the series of a study.
        since: only studies with StudyDate on or after this date; ``None`` for all.
        process: ``process(study_uid, series)`` segments the series, stores the SEG into the study with
            :meth:`PacsClient.store` (which confirms it is there) and returns its SOPInstanceUID; it raises on
            failure.
        ledger: the work directory's ledger.
        max_attempts: a study that failed this many times is skipped until its ledger entry is removed.

    Returns:
        The report; call :meth:`WatchReport.raise_for_failures` to turn failures into exit code 10.

    Raises:
        PacsUnavailableError, PacsAuthError: the PACS is down or refuses us (the pass stops; what it did is kept).
    """
    report = WatchReport()
    studies = client.find_studies(since)
    logger.info("PACS watch: %d studies%s", len(studies), f" since {since:%Y-%m-%d}" if since else "")
    for study in studies:
        entry = ledger.get(study, model_tag)
        if entry and entry.status == DONE:
            report.skipped[study] = f"done (SEG {entry.seg_sop_instance_uid})"
            continue
        if entry and entry.status == FAILED and entry.attempts >= max_attempts:
            report.skipped[study] = f"gave up after {entry.attempts} failed attempts (last: {entry.reason})"
            continue
        series_uid = None
        try:
            series = client.list_series(study)
            # The series list shows a SEG of this model: only then ask for its instance (one request less per study).
            tagged = any(s.modality.upper() == "SEG" and s.description == model_tag for s in series)
            existing = client.seg_from_model(study, model_tag) if tagged else None
            if existing:
                ledger.mark_done(study, model_tag, existing, reason="found on the PACS")
                report.skipped[study] = f"already holds a SEG of {model_tag} ({existing})"
                continue
            if not matching_series(series, rules):
                report.skipped[study] = NO_MATCHING_SERIES
                continue
            selected = select_series(series, rules, study_uid=study)
            series_uid = selected.uid
            ledger.mark_in_progress(study, model_tag, series_uid)
            seg_uid = process(study, selected)
            if not isinstance(seg_uid, str) or not seg_uid:
                raise InputDataError(f"study {study}", f"the segmentation returned {type(seg_uid).__name__}, "
                                                       "not the SEG's SOPInstanceUID")
        except Exception as exc:
            if isinstance(user_error(exc), (PacsUnavailableError, PacsAuthError)):
                # Down for everyone, or only this study's requests? A failing ping stops the pass, and the study,
                # still in progress, is redone next time without counting an attempt.
                client.ping()
            _record_failure(report, ledger, study, model_tag, _reason(exc), series_uid)
        else:
            ledger.mark_done(study, model_tag, seg_uid, series_uid)
            report.processed[study] = seg_uid
            logger.info("PACS watch: study %s: SEG %s stored", study, seg_uid)
    logger.info("PACS watch: %s", report.summary())
    return report


def _record_failure(report: WatchReport, ledger: WatchLedger, study: str, tag: str, reason: str,
                    series_uid: str | None) -> None:
    entry = ledger.mark_failed(study, tag, reason, series_uid)
    report.failed[study] = entry.reason
    logger.warning("PACS watch: study %s failed: %s", study, entry.reason)

