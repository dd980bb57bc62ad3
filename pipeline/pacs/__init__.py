"""PACS: DICOMweb access (QIDO-RS, WADO-RS, STOW-RS), one series segmented into a SEG, a scheduled watch pass.

A caller of the stages, like scheduling: it pulls a series from the PACS, segments it
with ``pipeline.inference`` and stores the DICOM SEG back into its study, and keeps a
ledger of what a watch pass did. It may import data, inference and the shared
modules, never scheduling, the stages or the CLI.
"""

from __future__ import annotations

from pipeline.pacs.client import PacsClient, model_tag, redact_url
from pipeline.pacs.segment import SegmentedSeries, segment_series
from pipeline.pacs.series import SegInstance, SeriesRules, SeriesSummary, matching_series, select_series
from pipeline.pacs.watch import LedgerEntry, WatchLedger, WatchReport, run_watch_pass
from pipeline.pacs.worklist import is_reader_label, pacs_items

__all__ = [
    "LedgerEntry",
    "PacsClient",
    "SegInstance",
    "SeriesRules",
    "SeriesSummary",
    "WatchLedger",
    "WatchReport",
    "is_reader_label",
    "matching_series",
    "model_tag",
    "pacs_items",
    "redact_url",
    "run_watch_pass",
    "segment_series",
    "select_series",
    "SegmentedSeries",
]
