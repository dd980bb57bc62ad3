"""The command line's parsers: every subcommand, its flags and their help (the docs' CLI reference is generated
from :func:`build_parser`), and the inference flags turned into overrides.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.errors import PipelineError

DEFAULT_WORK_DIR = "unet-work"


def _add_config_args(p: argparse.ArgumentParser, optional: bool) -> None:
    p.add_argument(
        "config", nargs="?" if optional else None, default=None,
        help="YAML config file" + (" (default: the packaged demo, configs/demo.yaml)" if optional else ""),
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), validated like the file")
    p.add_argument("--fold", type=int, default=None, help="cross-validation fold (same as --set data.fold=K)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--work-dir", type=Path, default=Path(DEFAULT_WORK_DIR),
                   help=f"work directory: data, checkpoints, evaluation, MLflow store (default ./{DEFAULT_WORK_DIR})")


def _add_schedule_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="train again even when data, config and code are unchanged since the last completed run")
    p.add_argument("--resume", action="store_true",
                   help="(kept for old scripts) an interrupted run is resumed automatically by the next plain call")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, action="append", dest="models",
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, a .pt checkpoint, or a folder "
                        "of fold_*/final.pt; repeat to ensemble")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of the network (default: the CPUs this job may use, shared with the other jobs "
                        "on this host: affinity mask, cgroup quota, SLURM_CPUS_PER_TASK, LOCAL_WORLD_SIZE, "
                        "UNET_PIPELINE_JOBS)")
    g = p.add_argument_group("inference settings (default: those the model was validated with, stored in it)")
    g.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time mirroring: average over axis flips")
    g.add_argument("--overlap", type=float, default=None, help="sliding-window overlap in [0, 1)")
    g.add_argument("--mode", choices=["gaussian", "constant"], default=None, help="window blending")
    g.add_argument("--sw-batch-size", type=int, default=None, help="windows (flips included) per forward pass")
    g.add_argument("--postprocess", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the model's keep-largest-component decision (--no-postprocess: raw argmax)")
    g.add_argument("--device-memory-gb", type=float, default=None,
                   help="cap the device memory; past it, stitching moves to host memory, then smaller window batches")
    g.add_argument("--compile", choices=["auto", "on", "off"], default=None,
                   help="CPU: torch.compile the network (auto: once a job is long enough to pay for it)")
    g.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default=None,
                   help="CPU: the network's arithmetic (auto: bfloat16 autocast where the CPU has native bf16)")


def _add_cache_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="YAML config whose registry.model_cache_max_gb and registry.compiled_cache_max_gb cap the "
                        "model and compiled-network caches (the inference settings stay the model's)")


def _overrides(args: argparse.Namespace):
    from pipeline.config import load_config
    from pipeline.inference import Overrides

    # The caches' caps are the machine's: from --config's registry section (the defaults without one).
    registry_cfg = load_config(args.config).registry
    o = Overrides(mirror=args.mirror, overlap=args.overlap, mode=args.mode, sw_batch_size=args.sw_batch_size,
                  postprocess=args.postprocess, memory_cap_gb=args.device_memory_gb, compile=args.compile,
                  precision=args.precision, model_cache_max_gb=registry_cfg.model_cache_max_gb,
                  compiled_cache_max_gb=registry_cfg.compiled_cache_max_gb)
    if o.overlap is not None and not 0 <= o.overlap < 1:
        raise PipelineError(f"--overlap must be in [0, 1), got {o.overlap}")
    if o.sw_batch_size is not None and o.sw_batch_size < 1:
        raise PipelineError(f"--sw-batch-size must be >= 1, got {o.sw_batch_size}")
    if o.memory_cap_gb is not None and o.memory_cap_gb <= 0:
        raise PipelineError(f"--device-memory-gb must be > 0, got {o.memory_cap_gb}")
    return o


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per stage."""
    parser = argparse.ArgumentParser(
        prog="unet-pipeline", description="Train, evaluate and run 2D/3D U-Nets on MRI and CT, tracked in MLflow."
    )
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("run", help="preprocess -> train -> evaluate -> gate -> register (no CONFIG: the embedded demo)")
    _add_config_args(p, optional=True)
    _add_common(p)
    _add_schedule_args(p)
    p.add_argument("--fail-if-not-promoted", action="store_true",
                   help="exit 6 when the new version does not take the champion alias")
    p = sub.add_parser("ensemble", help="register every fold of one cross-validation as one model version "
                                        "(a fold ensemble), gated like a run")
    _add_config_args(p, optional=True)
    _add_common(p)
    p.add_argument("--force", action="store_true",
                   help="register again even when these fold runs were registered as an ensemble before")
    p.add_argument("--fail-if-not-promoted", action="store_true",
                   help="exit 6 when the ensemble does not take the champion alias")
    p.add_argument("--evaluation-set", default=None, metavar="DATASET",
                   help="labelled cases none of the folds trained on, to score and gate the ensemble on "
                        "(default: registry.evaluation_set; give it when the folds ran without one)")
    p = sub.add_parser("preprocess", help="fingerprint, plan and preprocess a dataset (cached)")
    _add_config_args(p, optional=True)
    _add_common(p)
    p = sub.add_parser("train", help="preprocess and train; logs the model to MLflow")
    _add_config_args(p, optional=True)
    _add_common(p)
    _add_schedule_args(p)
    p = sub.add_parser("evaluate", help="Dice per label of a model on a labelled dataset")
    _add_model_args(p)
    _add_cache_config_arg(p)
    p.add_argument("--data", required=True, help="dataset.json or a folder holding one")
    p.add_argument("--cases", type=Path, default=None, metavar="FILE",
                   help="score only the cases listed in FILE, one id per line (a held-out test split, the "
                        "config's data.holdout; default: every labelled case)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default WORK_DIR/evaluation)")
    _add_common(p)
    p = sub.add_parser("predict", help="segment NIfTI files or DICOM series folders (or folders of them)")
    _add_model_args(p)
    _add_cache_config_arg(p)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="NIfTI file, DICOM series folder, or a folder holding NIfTI files and/or series folders")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder: CASE.nii.gz and CASE.json (volumes, estimated Dice, review flag) per case "
                        "(+ CASE.seg.dcm and CASE.sr.dcm for DICOM inputs), summary.csv and report.html")
    p.add_argument("--series-uid", default=None,
                   help="SeriesInstanceUID to read from DICOM folders holding several series")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write CASE_probabilities.nii.gz (X, Y, Z, classes), float32")
    p.add_argument("--no-seg", dest="write_seg", action="store_false",
                   help="do not write a DICOM SEG for DICOM series inputs")
    p.add_argument("--rtstruct", action="store_true",
                   help="also write CASE.rtstruct.dcm for DICOM series inputs: a DICOM RTSTRUCT, one ROI per class, "
                        "marked AUTOMATIC, for treatment-planning systems")
    p.add_argument("--overwrite", action="store_true", help="redo cases whose outputs already exist")
    p.add_argument("--min-expected-dice", type=float, default=None,
                   help="flag cases whose estimated Dice of any label is below this (default: the model's, "
                        "chosen on its validation cases)")
    _add_common(p)
    _add_pacs_parsers(sub)
    _add_worklist_parser(sub)
    _add_dataset_parsers(sub)
    _add_cache_parsers(sub)
    return parser


def _add_dataset_parsers(sub: argparse._SubParsersAction) -> None:
    ds = sub.add_parser("dataset", help="check or export a DICOM dataset: SEG/RTSTRUCT labels from a folder or DICOMweb")
    dsub = ds.add_subparsers(dest="dataset_command")
    for name, text in (("check", "list the cases a DICOM source gives for the config's classes, and every label "
                                 "it cannot use, with the reason"),
                       ("export", "write a DICOM source as an nnU-Net v2 / MSD dataset (imagesTr, labelsTr, "
                                  "dataset.json, manifest.json)")):
        p = dsub.add_parser(name, help=text, description=text + ". Credentials for a DICOMweb URL come from "
                            "DICOMWEB_USER/DICOMWEB_PASSWORD or DICOMWEB_TOKEN, as for pacs.")
        p.add_argument("source", help="a folder of DICOM files (any nesting) or a DICOMweb root URL")
        p.add_argument("--config", required=True, help="YAML config naming the classes (data.classes)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value (repeatable)")
        _add_common(p)
        if name == "check":
            p.add_argument("--json", action="store_true", help="print the manifest as JSON instead of the table")
        else:
            p.add_argument("--out", type=Path, required=True, help="the dataset folder to write (replaced whole)")


def _add_worklist_parser(sub: argparse._SubParsersAction) -> None:
    text = "what to correct next: the predictions of predict output folders and PACS SRs, worst estimate first"
    p = sub.add_parser("worklist", help=text, description=text + " (flagged first, as in the report); a series a "
                       "reader corrected since is left out. Credentials for a URL as for pacs (DICOMWEB_*).")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="a predict output folder or a DICOMweb root URL")
    p.add_argument("--model", metavar="NAME", help="this model's predictions (needed when the sources hold several)")
    p.add_argument("--structure", metavar="NAME", help="rank by this structure's estimated Dice, not the case's mean")
    p.add_argument("--limit", type=int, metavar="N", help="list only the N most urgent")
    p.add_argument("--out", type=Path, metavar="FILE.csv", help="write the list as CSV (atomically)")
    p.add_argument("--json", action="store_true", help='print {"items": [...]} as JSON instead of the table')
    p.add_argument("--config", help="YAML config: pacs.verify_tls, pacs.viewer_url, data.reader_edit_rules")
    p.add_argument("--viewer-url", help="OHIF root: a link VIEWER/viewer?StudyInstanceUIDs=UID per study")


def _add_cache_parsers(sub: argparse._SubParsersAction) -> None:
    text = ("the per-user cache of registered model versions (UNET_PIPELINE_CACHE, else ~/.cache/unet-pipeline): "
            "list or clear it")
    cache = sub.add_parser("cache", help=text, description=text + ". Its size cap: UNET_PIPELINE_CACHE_MAX_GB, "
                           "else registry.model_cache_max_gb; past it, the copies used longest ago are evicted.")
    csub = cache.add_subparsers(dest="cache_command", help="what to do with the cache")
    p = csub.add_parser("list", help="list the cached model versions, the one used longest ago first, with the "
                                     "total size and the cap")
    p.add_argument("--config", default=None,
                   help="YAML config whose registry.model_cache_max_gb is the cap shown (the environment overrides it)")
    p = csub.add_parser("clear", help="delete cached model versions (all of them, or one model's); the next use "
                                      "downloads them again")
    p.add_argument("--model", default=None, metavar="NAME", help="only this registered model's versions")
    p.add_argument("--version", default=None, help="only this version (with --model)")


def _add_pacs_parsers(sub: argparse._SubParsersAction) -> None:
    pacs = sub.add_parser("pacs", help="segment series from a PACS over DICOMweb and store the DICOM SEG and SR back")
    psub = pacs.add_subparsers(dest="pacs_command")
    for name, text in (("predict", "segment one study's series and store the SEG and SR into the study"),
                       ("watch", "one scheduled pass: every study with a matching series and no SEG of this model yet")):
        p = psub.add_parser(name, help=text, description=text + ". Credentials come from DICOMWEB_USER/"
                            "DICOMWEB_PASSWORD or DICOMWEB_TOKEN, never from the command line.")
        p.add_argument("--url", default=None, help="DICOMweb root, e.g. https://pacs.example.org/dicom-web (or pacs.url)")
        p.add_argument("--config", default=None, help="YAML config whose 'pacs' section holds url and series rules "
                                                      "(and whose registry section caps the caches, as for predict)")
        p.add_argument("--modality", default=None, help="series rule: Modality (e.g. MR)")
        p.add_argument("--series-description", default=None, help="series rule: regex searched in SeriesDescription")
        p.add_argument("--min-slices", type=int, default=None, help="series rule: fewest instances (default 10)")
        p.add_argument("--rtstruct", action="store_true", default=None,
                       help="also store a DICOM RTSTRUCT (one ROI per class, marked AUTOMATIC) beside the SEG, for "
                            "treatment-planning systems (or pacs.rtstruct: true)")
        _add_model_args(p)
        _add_common(p)
        if name == "predict":
            p.add_argument("--study", required=True, help="StudyInstanceUID")
            p.add_argument("--series", default=None, help="SeriesInstanceUID (default: chosen by the series rules)")
            p.add_argument("--out", type=Path, default=None,
                           help="also keep the NIfTI mask, SEG, SR and case record here (named by the series UID)")
        else:
            p.add_argument("--since", default=None, help="only studies from this date on (YYYY-MM-DD)")
