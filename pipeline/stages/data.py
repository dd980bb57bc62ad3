"""The data stages: discover the dataset (DICOM sources exported first), preprocess it, split it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.data import (
    Case,
    Dataset,
    PreprocessedCase,
    is_dicom_source,
    load_dataset,
    make_demo_dataset,
    materialise,
    preprocess_dataset,
    scan_source,
    select_cases,
    stored_splits,
    write_dataset,
)
from pipeline.training import resolve_device


@dataclass
class Prepared:
    """The dataset, its plan, preprocessed cases and the train/validation split.

    Args:
        dataset: the discovered dataset.
        plan: the preprocessing plan.
        cases: preprocessed cases by id.
        split: this fold's ``{"train": [...ids], "val": [...ids]}``.
        out_dir: the preprocessed folder.
        data_hash: the dataset's content hash.
        preprocessed: how many cases this call preprocessed (0: all reused from the cache).
    """

    dataset: Dataset
    plan: dict[str, Any]
    cases: dict[str, PreprocessedCase]
    split: dict[str, list[str]]
    out_dir: Path
    data_hash: str = ""
    preprocessed: int = 0

    def subset(self, part: str) -> list[PreprocessedCase]:
        """Preprocessed cases of ``"train"`` or ``"val"``."""
        return [self.cases[i] for i in self.split[part]]

    def raw_cases(self, part: str) -> list[Case]:
        """Original (unpreprocessed) cases of ``"train"`` or ``"val"``."""
        by_id = {c.case_id: c for c in self.dataset.cases}
        return [by_id[i] for i in self.split[part]]


def discover(cfg: PipelineConfig, work_dir: Path) -> Dataset:
    """The configured dataset, generating the synthetic demo data first when asked; without ``data.holdout``'s cases.

    Args:
        cfg: the pipeline configuration.
        work_dir: the work directory (demo data goes to ``work_dir/demo_data``).
    """
    dataset = _discover(cfg, work_dir)
    return dataset if cfg.data.holdout is None else select_cases(dataset, cfg.data.holdout, keep=False)


def _discover(cfg: PipelineConfig, work_dir: Path) -> Dataset:
    if cfg.data.dataset is None:
        path = make_demo_dataset(
            work_dir / "demo_data", cfg.data.synthetic_cases, cfg.data.synthetic_size, cfg.data.split_seed
        )
        return load_dataset(path)
    if is_dicom_source(cfg.data.dataset):
        d = cfg.data
        folder, _ = materialise(d.dataset, d.classes, d.label_aliases, work_dir, d.allow_automatic_labels,
                                cfg.pacs.verify_tls, d.channel_series, d.reader_edit_rules)
        return load_dataset(folder)
    return load_dataset(cfg.data.dataset)


def dataset_stage(cfg: PipelineConfig, source: str, work_dir: Path, out: Path | None = None):
    """Scan a DICOM folder or DICOMweb server with the config's classes; with ``out``, export it there.

    Args:
        cfg: the pipeline configuration (``data.classes``, ``data.label_aliases``, ``pacs.verify_tls``).
        source: a DICOM folder or a DICOMweb URL.
        work_dir: the work directory (its ``dicom_cache`` holds retrieved instances and conversions).
        out: write the nnU-Net v2 / MSD layout and ``manifest.json`` here.

    Returns:
        The :class:`~pipeline.data.DicomScan`, the :class:`~pipeline.data.PullStats` and the conversions made.
    """
    d = cfg.data
    scan, stats, converted = scan_source(source, d.classes, d.label_aliases, work_dir / "dicom_cache",
                                         d.allow_automatic_labels, cfg.pacs.verify_tls, d.channel_series,
                                         d.reader_edit_rules)
    if out is not None:
        write_dataset(scan, out, "dicom")
    return scan, stats, converted


def prepare(cfg: PipelineConfig, work_dir: Path) -> Prepared:
    """The preprocess stage: discover, fingerprint, plan, preprocess (cached) and the k-fold split.

    Holds ``work_dir/locks/preprocess.lock`` throughout: fold jobs started together wait for the
    first to preprocess, then find it all cached.

    Args:
        cfg: the pipeline configuration.
        work_dir: the work directory.
    """
    from pipeline.scheduling import preprocess_lock

    with preprocess_lock(work_dir, "preprocess", cfg.data.fold):
        dataset = discover(cfg, work_dir)
        out_dir = work_dir / "preprocessed"
        done = preprocess_dataset(cfg, dataset, out_dir, resolve_device(cfg.train.device))
        folds = stored_splits([c.case_id for c in done.cases], cfg.data.num_folds, cfg.data.split_seed,
                              work_dir / "splits.json")
    return Prepared(dataset, done.plan, {c.case_id: c for c in done.cases}, folds[cfg.data.fold], out_dir,
                    done.data_hash, len(done.redone))


def prepare_distributed(cfg: PipelineConfig, work_dir: Path) -> Prepared:
    """:func:`prepare` on rank 0 first; the other ``torchrun`` processes then read its cache.

    Args:
        cfg: the pipeline configuration.
        work_dir: the work directory.
    """
    from pipeline.training import distributed

    env = distributed.init(resolve_device(cfg.train.device).type)
    if env.is_main:
        prepared = prepare(cfg, work_dir)
    distributed.barrier()
    if not env.is_main:
        prepared = prepare(cfg, work_dir)
    return prepared


def checkpoint_dir(work_dir: Path, fold: int) -> Path:
    """Where a fold's ``best.pt`` and ``last.pt`` live.

    Args:
        work_dir: the work directory.
        fold: the cross-validation fold.
    """
    return work_dir / "checkpoints" / f"fold_{fold}"
