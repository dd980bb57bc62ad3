"""Data: dataset discovery, k-fold splits, fingerprint and planning, preprocessing, the demo data.

The first step of the flow: it turns a dataset folder (MSD/nnU-Net layout or a plain
folder of NIfTI files, or DICOM SEG/RTSTRUCT labels with their image series
from a folder or a DICOMweb server) into preprocessed cases, a plan and the cross-validation
splits, and holds the atomic file writers every later step uses. It imports nothing
of the other subpackages of ``pipeline`` (only ``pipeline.config``,
``pipeline.errors``, ``pipeline.dicomweb`` and ``transforms``): the device it plans for is passed in.
"""

from pipeline.data.dataset import Case, Dataset, load_dataset, read_case_list, select_cases, strip_nifti_suffix
from pipeline.data.demo import make_demo_dataset
from pipeline.data.dicom_dataset import DicomScan, edit_rule, label_summary, write_dataset
from pipeline.data.dicom_labels import LabelHeader, LabelProblem, read_label_header
from pipeline.data.dicom_source import PullStats, is_dicom_source, materialise, scan_source
from pipeline.data.files import Staged, atomic_file, cache_root, file_sha256, save_file, write_text_atomic
from pipeline.data.fingerprint import (
    intensity_distance,
    intensity_percentiles,
    label_volume_stats,
    label_voxel_counts,
    obliquity_deg,
    training_fingerprint,
)
from pipeline.data.mirroring import find_mirror_pairs, flip_permutation, mirror_swaps
from pipeline.data.preprocess import PreprocessedCase, preprocess_dataset
from pipeline.data.splits import kfold_splits, stored_splits

__all__ = [
    "Case",
    "Dataset",
    "DicomScan",
    "LabelHeader",
    "LabelProblem",
    "PullStats",
    "PreprocessedCase",
    "Staged",
    "atomic_file",
    "cache_root",
    "edit_rule",
    "file_sha256",
    "find_mirror_pairs",
    "flip_permutation",
    "intensity_distance",
    "is_dicom_source",
    "label_summary",
    "label_volume_stats",
    "label_voxel_counts",
    "materialise",
    "scan_source",
    "write_dataset",
    "intensity_percentiles",
    "obliquity_deg",
    "training_fingerprint",
    "kfold_splits",
    "load_dataset",
    "read_case_list",
    "select_cases",
    "make_demo_dataset",
    "mirror_swaps",
    "preprocess_dataset",
    "read_label_header",
    "save_file",
    "stored_splits",
    "strip_nifti_suffix",
    "write_text_atomic",
]
