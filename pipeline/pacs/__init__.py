"""The PACS layer: DICOMweb access (QIDO-RS, WADO-RS, STOW-RS) and the bookkeeping of a scheduled watch pass."""

from __future__ import annotations

from pipeline.pacs.client import (
    PacsClient,
    SegInstance,
    SeriesRules,
    SeriesSummary,
    matching_series,
    model_tag,
    redact_url,
    select_series,
)
from pipeline.pacs.watch import LedgerEntry, WatchLedger, WatchReport, run_watch_pass

__all__ = [
    "LedgerEntry",
    "PacsClient",
    "SegInstance",
    "SeriesRules",
    "SeriesSummary",
    "WatchLedger",
    "WatchReport",
    "matching_series",
    "model_tag",
    "redact_url",
    "run_watch_pass",
    "select_series",
]
