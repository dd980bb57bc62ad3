"""The worklist stage: read the predictions of ``predict`` folders and PACS, rank them for a reader."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def is_dicomweb_url(source: str) -> bool:
    """Whether a worklist source is a DICOMweb root (``http://`` or ``https://``) rather than a folder.

    Args:
        source: a command-line source.
    """
    return source.lower().startswith(("http://", "https://"))


def worklist_stage(sources: Sequence[str], pacs_cfg: Any, model: str | None = None, structure: str | None = None,
                   limit: int | None = None, edit_rules: list[dict[str, str]] | None = None,
                   viewer_url: str | None = None):
    """The ranked list of predictions to review, most urgent first, from ``predict`` folders and DICOMweb servers.

    Args:
        sources: ``predict`` output folders and DICOMweb root URLs.
        pacs_cfg: :class:`~pipeline.config.PacsConfig` (``verify_tls``; ``viewer_url`` for the links).
        model: the model whose predictions to list (``None``: the only one present).
        structure: rank by this structure's estimated Dice (``None``: the case's mean).
        limit: keep the first ``limit``.
        edit_rules: ``data.reader_edit_rules`` (an AUTOMATIC label they match is a reader's correction too).
        viewer_url: the viewer's root for the links (``None``: ``pacs_cfg.viewer_url``).

    Returns:
        The :class:`~pipeline.quality.worklist.Worklist`.
    """
    from pipeline.pacs import PacsClient, pacs_items
    from pipeline.quality import folder_items, rank

    items = []
    for source in sources:
        if is_dicomweb_url(source):
            client = PacsClient(source, verify_tls=pacs_cfg.verify_tls)
            client.ping()  # a PACS that is down or refuses us says so before anything else
            items += pacs_items(client, model, edit_rules)
        else:
            items += folder_items(Path(source))
    return rank(items, model, structure, limit, viewer_url or pacs_cfg.viewer_url)
