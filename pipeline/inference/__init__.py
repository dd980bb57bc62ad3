"""Inference: a handed-over model run on raw scans, from checkpoint to files on disk.

The checkpoint format and the settings a model was validated with, the model rebuilt
from its checkpoint (or a fold ensemble's models from theirs), our sliding-window engine and its CPU acceleration, the
keep-largest-component postprocessing, the output writers (NIfTI, DICOM SEG and SR, case records) and batch
``predict`` over files and folders. It may import ``pipeline.data`` (and
``models``, ``transforms``, ``pipeline.config``, ``pipeline.errors``), never
evaluation, training, registry, scheduling or pacs: training-time validation uses
this engine, not the other way round.
"""

from pipeline.inference import accelerate
from pipeline.inference.checkpoints import load_checkpoint, read_checkpoint_file, save_checkpoint
from pipeline.inference.dicom_rtstruct import write_dicom_rtstruct
from pipeline.inference.dicom_seg import Algorithm, seg_series_description, write_dicom_seg
from pipeline.inference.dicom_sr import (
    PredictionReport,
    ReviewFlag,
    SegmentMeasurement,
    measurements_of,
    read_dicom_sr,
    read_prediction_report,
    review_of,
    write_dicom_sr,
)
from pipeline.inference.ensemble import check_same_plan, save_ensemble
from pipeline.inference.model import (
    LoadedModel,
    compile_ahead_of_time,
    load_model,
    load_model_from_checkpoint,
    load_models,
)
from pipeline.inference.outputs import write_label_map
from pipeline.inference.postprocessing import Postprocessing
from pipeline.inference.predict import PredictReport, algorithm_for, exit_code, expand_inputs, group_cases, predict_cases, shard
from pipeline.inference.predictor import Predictor, class_argmax
from pipeline.inference.settings import InferenceSettings, Overrides, inference_section
from pipeline.inference.sliding_window import SlidingWindowInferer, WindowSettings, tile_starts, window_size

__all__ = [
    "class_argmax",
    "PredictReport",
    "PredictionReport",
    "ReviewFlag",
    "expand_inputs",
    "group_cases",
    "predict_cases",
    "shard",
    "Algorithm",
    "InferenceSettings",
    "LoadedModel",
    "Overrides",
    "Postprocessing",
    "Predictor",
    "SegmentMeasurement",
    "SlidingWindowInferer",
    "WindowSettings",
    "accelerate",
    "algorithm_for",
    "compile_ahead_of_time",
    "exit_code",
    "inference_section",
    "load_checkpoint",
    "load_model",
    "load_model_from_checkpoint",
    "load_models",
    "check_same_plan",
    "read_checkpoint_file",
    "save_ensemble",
    "measurements_of",
    "read_dicom_sr",
    "review_of",
    "read_prediction_report",
    "save_checkpoint",
    "seg_series_description",
    "tile_starts",
    "window_size",
    "write_dicom_rtstruct",
    "write_dicom_seg",
    "write_dicom_sr",
    "write_label_map",
]
