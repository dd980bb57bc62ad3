"""The configuration's schema: one dataclass per section, each key documented in its ``Attributes:``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

#: DICOM attributes a ``data.reader_edit_rules`` rule may match (object-level, plus each segment's algorithm name).
READER_EDIT_ATTRIBUTES = ("Manufacturer", "ManufacturerModelName", "SoftwareVersions", "SeriesDescription",
                          "ContentCreatorName", "ContentLabel", "ContentDescription", "StructureSetLabel",
                          "StructureSetName", "SegmentAlgorithmName")


@dataclass
class DataConfig:
    """Where the cases come from and how they are split (paths relative to the config file; see docs/data.md).

    Attributes:
        dataset: a dataset.json, an MSD/nnU-Net folder, a DICOM folder, or a DICOMweb URL (http(s)://.../dicom-web).
        synthetic_cases: with no dataset, how many synthetic demo cases to generate.
        synthetic_size: the synthetic cases' size in voxels (three sizes of at least 25).
        num_folds: cross-validation folds of the stored split.
        fold: the fold this run validates on (0-based).
        split_seed: seed of the stored split's shuffle.
        classes: class names in label order (label 1 first); a DICOM dataset needs them to match segments and ROIs by name.
        label_aliases: class name -> other names, or SegmentedPropertyType codes as SCHEME:VALUE, that also match it.
        allow_automatic_labels: let AUTOMATIC DICOM SEGs and RTSTRUCTs (a model's or an auto-contouring system's output,
            per segment/ROI of a configured class) be training labels; off, only a reader's labels train.
        reader_edit_rules: rules that recognise a reader's edit a viewer saved as AUTOMATIC (MONAI Label, OHIF, Slicer
            keep a model's type on an edited segment): each maps DICOM attributes (Manufacturer, ManufacturerModelName,
            SoftwareVersions, SeriesDescription, ContentCreatorName, ContentLabel, ContentDescription,
            StructureSetLabel, StructureSetName, SegmentAlgorithmName) to a regex that must be found in its value
            (case-insensitive); an object matching every entry of a rule is a reader's label. Never this project's
            own objects (Manufacturer unet-pipeline). See docs/data.md.
        channel_series: a DICOM dataset's further channels: a regex per channel, searched in SeriesDescription in the study.
        holdout: a file of case ids (one per line) kept out of everything a run reads: fingerprint, plan, folds,
            training, validation, calibration; a held-out test split, scored by ``evaluate --cases`` (see docs/tasks.md).
    """

    dataset: str | None = None
    synthetic_cases: int = 0
    synthetic_size: list[int] = field(default_factory=lambda: [48, 48, 48])
    num_folds: int = 5
    fold: int = 0
    split_seed: int = 0
    classes: list[str] | None = None
    label_aliases: dict[str, list[str]] | None = None
    allow_automatic_labels: bool = False
    reader_edit_rules: list[dict[str, str]] | None = None
    channel_series: list[str] | None = None
    holdout: str | None = None


@dataclass
class PreprocessConfig:
    """Spatial and intensity preprocessing applied before training and inference.

    Attributes:
        target_spacing: voxel spacing in mm every case is resampled to; null: planned (the median spacing, or a
            coarser lower-resolution stage where the patch would cover under a quarter of the median case).
        orientation: axis codes everything is reoriented to (e.g. RAS).
        normalization: ``auto`` (CT: clipped, dataset z-score; else per-volume z-score), ``zscore``, ``ct`` or ``none``.
    """

    target_spacing: list[float] | None = None
    orientation: str = "RAS"
    normalization: Literal["auto", "zscore", "ct", "none"] = "auto"


@dataclass
class ModelConfig:
    """U-Net architecture (see :class:`models.unet.UNet`). ``features: null`` takes the plan's.

    Attributes:
        spatial_dims: 3, or 2 (slices along the third axis).
        features: widths per level, finest first, the last one the bottleneck; null: planned.
        norm: the normalisation layers, ``instance`` or ``batch``.
        deep_supervision: Dice+CE on the coarser decoder outputs too (weights halve per level).
    """

    spatial_dims: Literal[2, 3] = 3
    features: list[int] | None = None
    norm: Literal["batch", "instance"] = "instance"
    deep_supervision: bool = True


@dataclass
class TrainConfig:
    """Optimisation schedule. ``patch_size``/``batch_size: null`` take the plan's.

    Attributes:
        epochs: the number of epochs (with a time budget: the most epochs).
        iterations_per_epoch: steps (batches of patches) per epoch; 0: one pass over the training cases.
        time_budget_minutes: wall-clock cap on training and its validation passes; the learning-rate decay follows it.
        batch_size: patches per step; null: planned (for the device's memory).
        patch_size: patch size in voxels; null: planned (the median case, rounded up on a GPU, down on a CPU).
        foreground_ratio: share of patches centred on foreground.
        optimizer: ``adamw`` or ``sgd`` (Nesterov, momentum 0.99), both with poly decay; AdamW by default: in a
            short CPU budget it learns far faster (5-minute hippocampus trial: Dice 0.86 against SGD's 0.64).
        learning_rate: the peak learning rate.
        weight_decay: the optimiser's weight decay.
        augment: rotation, scaling, flips, noise, intensity scale and gamma augmentation (MONAI).
        elastic: add elastic deformation (3D) or in-plane shear (2D) to the augmentation.
        val_every: sliding-window validation every N epochs (under a time budget, fewer when passes would take >10%).
        seed: the training seed (weights, patches, augmentation).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        amp: mixed precision of the forward pass: float16 on CUDA, bfloat16 on a CPU with native bf16, else float32.
        num_threads: torch threads; 0: the CPUs this job is given (affinity mask, cgroup quota,
            SLURM_CPUS_PER_TASK), split between the jobs on its host (LOCAL_WORLD_SIZE, UNET_PIPELINE_JOBS).
        num_workers: data loader workers (1 thread each); null: 0 on a CPU, on a GPU the job's CPUs less one
            (1 to 8).
        memory_budget_gb: GPU memory the planner sizes the batch for; null: the device's.
        ema_decay: exponential moving average of the weights per step (e.g. 0.999); null: none.
    """

    epochs: int = 1000
    iterations_per_epoch: int = 100
    time_budget_minutes: float | None = None
    batch_size: int | None = None
    patch_size: list[int] | None = None
    foreground_ratio: float = 0.33
    optimizer: Literal["sgd", "adamw"] = "adamw"
    learning_rate: float = 2e-3
    weight_decay: float = 3e-5
    augment: bool = True
    elastic: bool = False
    val_every: int = 10
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    num_threads: int = 0
    num_workers: int | None = None
    memory_budget_gb: float | None = None
    ema_decay: float | None = None


@dataclass
class EvaluateConfig:
    """Inference settings the model is validated with, stored with it and used by ``predict`` unless a flag overrides them.

    Attributes:
        checkpoint: what ``run`` evaluates and registers: ``final`` (unbiased) or ``best`` (best validation epoch).
        mirror: test-time mirroring (average over axis flips, nnU-Net's default).
        overlap: sliding-window overlap in [0, 1).
        mode: window blending, ``gaussian`` or ``constant``.
        sw_batch_size: windows (flips included) per forward pass.
        postprocess: decide keep-largest-component removal on the validation cases (kept only where it raised Dice).
        surface_tolerance_mm: the surface Dice tolerance in mm.
        qc_images: one QC picture per evaluated case (logged to MLflow under a pseudonym).
        precision: the network's arithmetic on a CPU: ``auto`` (bf16 where the CPU has native bf16), ``float32``, ``bfloat16``.
    """

    checkpoint: Literal["final", "best"] = "final"
    mirror: bool = True
    overlap: float = 0.5
    mode: Literal["gaussian", "constant"] = "gaussian"
    sw_batch_size: int = 4
    postprocess: bool = True
    surface_tolerance_mm: float = 1.0
    qc_images: bool = True
    precision: Literal["auto", "float32", "bfloat16"] = "auto"


@dataclass
class QcConfig:
    """The review flag of every prediction: a low estimated Dice, or an input unlike the training data (docs/quality.md).

    Attributes:
        min_expected_dice: flag a case when any label's estimated Dice is below this; null: chosen during ``run``.
        flag_quantile: with ``min_expected_dice`` null, the share of validation cases the chosen threshold flags.
        estimator: the map from a prediction's signals to its estimated Dice, fitted on the validation cases:
            ``linear`` (least squares on the model's own probabilities) or ``agreement`` (a monotone map from the
            mirrored passes' agreement; docs/quality.md).
    """

    min_expected_dice: float | None = None
    flag_quantile: float = 0.19
    estimator: Literal["linear", "agreement"] = "linear"


@dataclass
class MlflowConfig:
    """Tracking and registry.

    Attributes:
        tracking_uri: the tracking server or store; null: ``MLFLOW_TRACKING_URI``, else ``sqlite:///WORK_DIR/mlflow.db``.
        experiment: the MLflow experiment name.
        model_name: the registered model's name.
        outage_wait_minutes: at the end of a run, how long to wait for a tracking server that went away (then exit 5).
    """

    tracking_uri: str | None = None
    experiment: str = "unet-pipeline"
    model_name: str = "unet"
    outage_wait_minutes: float = 10.0


@dataclass
class RegistryConfig:
    """The champion gate: candidate and champion scored on the same cases, one gate at a time (docs/registry.md).

    Attributes:
        promote_margin: how much the candidate's mean Dice must beat the champion's by to take ``champion``.
        evaluation_set: a labelled dataset both models are scored on; empty: the candidate's validation fold.
        compile_ahead_of_time: compile a registered version's network for the CPU once, at registration (OpenVINO's IR
            where it is on, else the AOTInductor package).
        gate_lease_s: seconds a gate's lease lasts; a job killed while holding it blocks the next for at most this.
        gate_wait_s: seconds a gate waits for another's lease before it ends with exit 3.
        model_cache_max_gb: size cap of the per-user model cache in GB (null: no cap; least recently used copies go
            first, never one in use); ``UNET_PIPELINE_CACHE_MAX_GB`` overrides it.
        compiled_cache_max_gb: size cap of the per-user cache of networks compiled ahead of time in GB (null: no
            cap; after each build the packages used longest ago go first, never the one just built).
    """

    promote_margin: float = 0.0
    evaluation_set: str | None = None
    compile_ahead_of_time: bool = True
    gate_lease_s: float = 60.0
    gate_wait_s: float = 3600.0
    model_cache_max_gb: float | None = 20.0
    compiled_cache_max_gb: float | None = 5.0


@dataclass
class PacsConfig:
    """The PACS for ``pacs predict|watch``; flags override each key; credentials never go here (``DICOMWEB_*``).

    Attributes:
        url: the DICOMweb root (``--url`` overrides).
        viewer_url: the root of a web viewer on the same PACS (OHIF, e.g. https://ohif.example.org): the worklist
            links each study as VIEWER/viewer?StudyInstanceUIDs=UID (``--viewer-url`` overrides).
        verify_tls: verify the server's TLS certificate (``false`` only for a lab's test server).
        modality: series rule: the DICOM Modality (e.g. MR).
        series_description: series rule: a regular expression searched case-insensitively in SeriesDescription.
        min_slices: series rule: the fewest instances a series must have (leaves out localisers).
        rtstruct: also store an RTSTRUCT (one ROI per class, ROIGenerationAlgorithm AUTOMATIC) beside the SEG, for
            treatment-planning systems (``--rtstruct`` turns it on).
    """

    url: str | None = None
    viewer_url: str | None = None
    verify_tls: bool = True
    modality: str | None = None
    series_description: str | None = None
    min_slices: int = 10
    rtstruct: bool = False


@dataclass
class PipelineConfig:
    """The whole configuration; one section per stage."""

    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    qc: QcConfig = field(default_factory=QcConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    pacs: PacsConfig = field(default_factory=PacsConfig)
    source: str = field(default="<defaults>", metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain data (what is logged to MLflow)."""
        out = dataclasses.asdict(self)
        out.pop("source")
        return out

    def flat(self) -> dict[str, Any]:
        """``section.key -> value`` pairs, for MLflow params."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}
