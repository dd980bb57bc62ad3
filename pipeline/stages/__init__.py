"""The stages wired together: config -> data -> preprocess -> train -> evaluate -> registry.

The CLI and the scripts call these; each wires the subpackages below it (data, training, evaluation,
registry, scheduling, pacs) and grows no logic of its own. ``data`` discovers and prepares a dataset
(a DICOM source is exported into the work directory first), ``training`` runs, registers and
ensembles folds, ``inference`` evaluates, predicts and segments PACS studies with registered models, ``worklist``
ranks the predictions of folders and PACS for a reader.
"""

from pipeline.stages.data import Prepared, checkpoint_dir, dataset_stage, discover, prepare, prepare_distributed
from pipeline.stages.inference import (
    evaluate_stage,
    load_predictor,
    pacs_predict_stage,
    pacs_watch_stage,
    predict_stage,
)
from pipeline.stages.training import RunSummary, ensemble_stage, run_stage, train_stage
from pipeline.stages.worklist import worklist_stage

__all__ = [
    "Prepared",
    "RunSummary",
    "checkpoint_dir",
    "dataset_stage",
    "discover",
    "ensemble_stage",
    "evaluate_stage",
    "load_predictor",
    "pacs_predict_stage",
    "pacs_watch_stage",
    "predict_stage",
    "prepare",
    "prepare_distributed",
    "run_stage",
    "train_stage",
    "worklist_stage",
]
