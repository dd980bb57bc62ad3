"""The inference stages: evaluate and predict with registered models, segment studies on the PACS."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import registry
from pipeline.data import (
    load_dataset,
    select_cases,
)

# Model references -> one predictor (a registered fold ensemble brings every fold) is the registry's.
load_predictor = registry.load_predictor


def evaluate_stage(model_refs: Sequence[str], data: str, out_dir: Path, work_dir: Path, overrides=None,
                   device: str = "auto", cases: str | Path | None = None) -> dict[str, Any]:
    """Evaluate a model on every labelled case of a dataset (or the listed ones), with its stored inference settings.

    Args:
        model_refs: model references accepted by :func:`registry.resolve_model`, or folders of
            ``fold_*/final.pt``; several are ensembled (softmax averaged).
        data: a ``dataset.json`` or a folder holding one.
        out_dir: where ``cases.csv``, ``summary.json`` and ``predictions/`` go.
        work_dir: work directory (its SQLite store is the default registry).
        overrides: :class:`~pipeline.inference.Overrides` of the stored inference settings.
        device: ``auto``, ``cpu`` or ``cuda``.
        cases: a file of case ids (a held-out test split): only those are scored.
    """
    from pipeline.evaluation import evaluate_cases

    dataset = load_dataset(data)
    if cases is not None:
        dataset = select_cases(dataset, cases, keep=True)
    predictor, identity = load_predictor(model_refs, work_dir, overrides, device)
    return evaluate_cases(predictor, dataset.cases, out_dir,
                          model={"name": identity.name, "version": str(identity.version)}).summary


def predict_stage(model_refs: Sequence[str], inputs: Sequence[str], out_dir: Path, work_dir: Path, overrides=None,
                  device: str = "auto", series_uid: str | None = None, save_probabilities: bool = False,
                  write_seg: bool = True, overwrite: bool = False, min_expected_dice: float | None = None,
                  write_rtstruct: bool = False):
    """Segment NIfTI files and DICOM series (or folders of them): one NIfTI label map per case on the
    input's grid, optional probabilities, and a DICOM SEG for DICOM inputs; under ``torchrun`` the cases
    are shared across ranks.

    Args:
        model_refs: model references accepted by :func:`registry.resolve_model`, or folders of
            ``fold_*/final.pt``; several are ensembled (softmax averaged).
        inputs: NIfTI files, DICOM series folders, or folders of them.
        out_dir: output folder (created).
        work_dir: work directory (its SQLite store is the default registry).
        overrides: :class:`~pipeline.inference.Overrides` of the stored inference settings.
        device: ``auto``, ``cpu`` or ``cuda``.
        series_uid: the DICOM series to read from input folders holding several.
        save_probabilities: also write per-class probability maps.
        write_seg: write a DICOM SEG for DICOM series inputs.
        overwrite: redo cases whose outputs already exist.
        min_expected_dice: the review threshold (``None``: the model's).
        write_rtstruct: also write an RTSTRUCT (AUTOMATIC ROIs) for DICOM series inputs.

    Returns:
        The :class:`~pipeline.inference.predict.PredictReport`.
    """
    from pipeline.inference import algorithm_for, expand_inputs, group_cases, predict_cases, shard

    predictor, identity = load_predictor(model_refs, work_dir, overrides, device, series_uid)
    found = expand_inputs(inputs)
    cases = group_cases(found, len(predictor.plan["modalities"]))
    algorithm = algorithm_for(identity.name, identity.version)
    return predict_cases(predictor, shard(cases), out_dir, algorithm, series_uid, save_probabilities, write_seg,
                         overwrite, min_expected_dice=min_expected_dice, batch=cases, write_rtstruct=write_rtstruct)


def _pacs_setup(url: str, rules_cfg: Any, verify_tls: bool):
    from pipeline.pacs import PacsClient, SeriesRules

    client = PacsClient(url, verify_tls=verify_tls)
    rules = SeriesRules(rules_cfg.modality, rules_cfg.series_description, rules_cfg.min_slices)
    return client, rules


def pacs_predict_stage(url: str, study_uid: str, series_uid: str | None, model_refs: Sequence[str], work_dir: Path,
                       pacs_cfg: Any, overrides=None, device: str = "auto", keep_in: Path | None = None):
    """Segment one series of a study on the PACS and store the DICOM SEG back into the study.

    Args:
        url: the DICOMweb root.
        study_uid: the study.
        series_uid: the series (``None``: chosen by ``pacs_cfg``'s rules).
        model_refs: the model(s), as for ``predict``.
        work_dir: the work directory (default registry).
        pacs_cfg: :class:`~pipeline.config.PacsConfig` (series rules, TLS, ``rtstruct``).
        overrides: inference setting overrides.
        device: ``auto``, ``cpu`` or ``cuda``.
        keep_in: also keep the NIfTI mask and the SEG in this folder.
    """
    from pipeline.inference import algorithm_for
    from pipeline.pacs import segment_series, select_series

    client, rules = _pacs_setup(url, pacs_cfg, pacs_cfg.verify_tls)
    client.ping()
    series = select_series(client.list_series(study_uid), rules, series_uid, study_uid)
    predictor, identity = load_predictor(model_refs, work_dir, overrides, device)
    return segment_series(client, predictor, algorithm_for(identity.name, identity.version), study_uid, series, keep_in,
                          pacs_cfg.rtstruct)


def pacs_watch_stage(url: str, model_refs: Sequence[str], work_dir: Path, pacs_cfg: Any, since=None, overrides=None,
                     device: str = "auto"):
    """One scheduled pass: segment every study with a matching series and no SEG of this model version yet.

    Holds the work directory's lock; records what it did in ``work_dir/pacs/ledger.json``.

    Args:
        url: the DICOMweb root.
        model_refs: the model(s), as for ``predict``.
        work_dir: the work directory (lock, ledger, default registry).
        pacs_cfg: :class:`~pipeline.config.PacsConfig` (series rules, TLS).
        since: only studies from this date on (``datetime.date``), or ``None``.
        overrides: inference setting overrides.
        device: ``auto``, ``cpu`` or ``cuda``.
    """
    from pipeline.inference import algorithm_for
    from pipeline.pacs import WatchLedger, model_tag, run_watch_pass, segment_series
    from pipeline.scheduling import work_dir_lock

    with work_dir_lock(work_dir, "pacs watch"):
        client, rules = _pacs_setup(url, pacs_cfg, pacs_cfg.verify_tls)
        client.ping()
        predictor, identity = load_predictor(model_refs, work_dir, overrides, device)
        algorithm = algorithm_for(identity.name, identity.version)
        tag = model_tag(identity.name, identity.version)

        def process(study_uid: str, series: Any) -> str:
            return segment_series(client, predictor, algorithm, study_uid, series,
                                  rtstruct=pacs_cfg.rtstruct).seg_sop_instance_uid

        return run_watch_pass(client, tag, rules, since, process, WatchLedger(work_dir))
