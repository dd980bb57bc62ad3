"""Where a DICOM dataset's instances come from: a folder, or a DICOMweb server pulled into a local cache.

From a server, the label series (Modality SEG and RTSTRUCT) of every study are listed with QIDO-RS,
and their instances and those of the image series they reference are retrieved with WADO-RS,
concurrently (bounded), into ``CACHE/instances/SOP_INSTANCE_UID.dcm``; an instance already there is
never retrieved again. Only what the server lists now takes part, so a label deleted on the PACS
leaves the dataset even though its file stays in the cache.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from pipeline.data.dicom_dataset import (
    DicomScan,
    is_dicom_source,
    scan_instances,
    write_dataset,
)
from pipeline.data.dicom_index import folder_files, index_files
from pipeline.data.dicom_labels import ClassMatcher, LabelProblem, read_label_header
from pipeline.errors import ConfigError

if TYPE_CHECKING:  # DICOMweb is imported when a pull needs it: a model loaded for inference never does
    from pipeline.dicomweb import DicomWebClient

logger = logging.getLogger(__name__)

#: Concurrent WADO-RS requests: enough to hide the round trips, few enough not to flood a clinical PACS.
MAX_WORKERS = 8


@dataclass
class PullStats:
    """What one pull did.

    Args:
        listed: instances the server listed (labels and the image series they reference).
        retrieved: instances retrieved by this call (0: all in the cache).
        label_series: label series found.
    """

    listed: int = 0
    retrieved: int = 0
    label_series: int = 0


def _fetch(client: DicomWebClient, wanted: list[tuple[str, str, str]], cache: Path, what: str,
           stats: PullStats) -> list[Path]:
    paths = [cache / f"{sop}.dcm" for _, _, sop in wanted]
    missing = [(key, path) for key, path in zip(wanted, paths) if not path.is_file()]
    stats.listed += len(wanted)
    if missing:
        # disable=None: a bar on a terminal, none in a scheduled job's log (the summary line says what was pulled).
        with ThreadPoolExecutor(MAX_WORKERS) as pool, tqdm(total=len(missing), desc=f"retrieving {what}",
                                                           unit="instance", leave=False, disable=None) as bar:
            futures = [pool.submit(client.retrieve_instance, *key, path) for key, path in missing]
            for future in futures:
                future.result()
                bar.update(1)
        stats.retrieved += len(missing)
    return paths


def _instances(client: DicomWebClient, series: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """``(study, series, sop)`` of every instance of these series; the QIDO-RS lists are asked for concurrently."""
    with ThreadPoolExecutor(MAX_WORKERS) as pool:
        listed = list(pool.map(lambda key: sorted(client.instance_uids(*key)), series))
    return [(study, uid, sop) for (study, uid), sops in zip(series, listed) for sop in sops]


def pull(url: str, cache: Path, verify_tls: bool = True,
         channels: tuple[str, ...] = ()) -> tuple[list[Path], PullStats]:
    """Bring the label objects of a DICOMweb server and the image series they reference into ``cache``.

    Args:
        url: the DICOMweb root (credentials from the environment, as for ``pacs``).
        cache: the instance cache folder.
        verify_tls: verify the server's TLS certificate.
        channels: a multi-channel task's channel patterns: the matching series of each labelled study come too.

    Returns:
        The cached files of every instance the server lists now, and what the pull did.
    """
    from pipeline.dicomweb import DicomWebClient, redact_url

    client = DicomWebClient(url, verify_tls=verify_tls)
    client.ping()
    stats = PullStats()
    label_series = client.find_series("SEG") + client.find_series("RTSTRUCT")
    stats.label_series = len(label_series)
    wanted = _instances(client, [(study, s.uid) for study, s in label_series])
    label_files = _fetch(client, wanted, cache, "labels", stats)
    images: set[tuple[str, str]] = set()
    for path in label_files:
        try:
            header = read_label_header(path)
        except LabelProblem:
            continue  # reported with its reason when the dataset is scanned
        if header is not None and header.series_uid:
            images.add((header.study_uid, header.series_uid))
    for study in sorted({study for study, _ in images} if channels else ()):
        images.update((study, s.uid) for s in client.list_series(study)
                      if any(re.search(c, s.description, re.IGNORECASE) for c in channels))
    image_wanted = _instances(client, sorted(images))
    image_files = _fetch(client, image_wanted, cache, "images", stats)
    logger.info("%s: %d label series, %d instances listed, %d retrieved", redact_url(url), stats.label_series,
                stats.listed, stats.retrieved)
    return label_files + image_files, stats


def scan_source(spec: str, classes: list[str] | None, aliases: dict[str, list[str]] | None, cache: Path,
                allow_automatic: bool = False, verify_tls: bool = True,
                channels: list[str] | None = None,
                edit_rules: list[dict[str, str]] | None = None) -> tuple[DicomScan, PullStats, int]:
    """Scan a DICOM folder or DICOMweb server: the cases it gives for these classes, and the labels it cannot.

    Args:
        spec: a folder or a DICOMweb URL (``data.dataset``).
        classes: the class names in label order (``data.classes``).
        aliases: class name -> aliases or codes (``data.label_aliases``).
        cache: the cache folder (instances, header index, conversions).
        allow_automatic: AUTOMATIC SEGs and RTSTRUCTs may be training labels.
        verify_tls: verify a server's TLS certificate (``pacs.verify_tls``).
        channels: a multi-channel task's further channels (``data.channel_series``).
        edit_rules: ``data.reader_edit_rules`` (AUTOMATIC objects they match are a reader's edits).

    Returns:
        The scan, what the pull did (zeros for a folder), and how many conversions this call made.
    """
    from pipeline.dicomweb import redact_url

    if not classes:
        raise ConfigError(f"data.dataset {redact_url(spec) if '://' in spec else spec} is a DICOM source: "
                          "name the classes in data.classes (label 1 first), so that segments and ROIs "
                          "can be matched to them by name")
    if spec.startswith(("http://", "https://")):
        files, stats = pull(spec, cache / "instances", verify_tls, tuple(channels or ()))
    else:
        files, stats = folder_files(Path(spec)), PullStats()
    instances = index_files(files, cache / "index.json")
    scan, converted = scan_instances(instances, ClassMatcher.from_config(classes, aliases), cache, allow_automatic,
                                     tuple(channels or ()), edit_rules)
    return scan, stats, converted


def materialise(spec: str, classes: list[str] | None, aliases: dict[str, list[str]] | None, work_dir: Path,
                allow_automatic: bool = False, verify_tls: bool = True,
                channels: list[str] | None = None,
                edit_rules: list[dict[str, str]] | None = None) -> tuple[Path, DicomScan]:
    """A DICOM source as a dataset folder in the work directory (``work_dir/dicom_dataset``), for training.

    Args:
        spec: a folder or a DICOMweb URL (``data.dataset``).
        classes: the class names in label order (``data.classes``).
        aliases: class name -> aliases or codes (``data.label_aliases``).
        work_dir: the work directory (the cache is ``work_dir/dicom_cache``).
        allow_automatic: AUTOMATIC SEGs and RTSTRUCTs may be training labels.
        verify_tls: verify a server's TLS certificate.
        channels: a multi-channel task's further channels (``data.channel_series``).
        edit_rules: ``data.reader_edit_rules``.

    Returns:
        The dataset folder (``dataset.json``, ``manifest.json``) and the scan.
    """
    scan, stats, converted = scan_source(spec, classes, aliases, work_dir / "dicom_cache", allow_automatic, verify_tls,
                                         channels, edit_rules)
    out = work_dir / "dicom_dataset"
    write_dataset(scan, out, "dicom")
    logger.warning("DICOM dataset: %d case(s), %d label(s) skipped, %d not used (%d AUTOMATIC, set aside: "
                   "data.allow_automatic_labels or data.reader_edit_rules accept them; the others superseded); "
                   "%d instance(s) retrieved, %d conversion(s)", len(scan.cases), len(scan.skipped),
                   len(scan.not_used), scan.automatic, stats.retrieved, converted)
    return out, scan


__all__ = ["PullStats", "is_dicom_source", "materialise", "pull", "scan_source"]
