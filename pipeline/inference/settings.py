"""The inference settings a model was validated with, stored in its checkpoint.

A checkpoint carries, besides its weights and preprocessing plan, an ``inference``
section: mirroring, overlap, blending, windows per batch, the postprocessing
decision, label names and the package version. :class:`~pipeline.inference.predictor.Predictor`
uses those by default, so ``predict`` and ``evaluate`` give exactly what was validated;
explicit overrides (CLI flags) change one setting at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any

from pipeline.config.schema import RegistryConfig
from pipeline.inference.postprocessing import Postprocessing
from pipeline.inference.sliding_window import WindowSettings

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig


def package_version() -> str:
    """This package's version (``0+unknown`` when run from a source tree that was not installed)."""
    try:
        return metadata.version("unet-pipeline")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class InferenceSettings:
    """How a model predicts: what it was validated with, stored in its checkpoint.

    Args:
        mirror: test-time mirroring (nnU-Net's default: on).
        overlap: sliding-window overlap in [0, 1).
        mode: window blending, ``gaussian`` or ``constant``.
        sw_batch_size: windows (flips included) per forward pass.
        postprocessing: the keep-largest-component decision (see :mod:`pipeline.inference.postprocessing`).
        precision: the network's arithmetic on a CPU: ``auto`` (bfloat16 autocast where the CPU
            has a native bf16 dot product, else float32), ``float32`` or ``bfloat16``.
    """

    mirror: bool = True
    overlap: float = 0.5
    mode: str = "gaussian"
    sw_batch_size: int = 4
    postprocessing: Postprocessing = field(default_factory=Postprocessing)
    precision: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the checkpoint, MLflow and JSON."""
        return {"mirror": self.mirror, "overlap": self.overlap, "mode": self.mode, "sw_batch_size": self.sw_batch_size,
                "postprocessing": self.postprocessing.to_dict(), "precision": self.precision}

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> InferenceSettings:
        """What a training run validates with and stores: ``evaluate``, mirroring only where training flipped.

        Test-time mirroring averages the network over flipped copies of the scan. A network trained
        without flips (``train.augment: false``) has never seen them: on hippocampus fold 0 such a
        model scored 0.05 mean Dice with mirroring against 0.89 without. As nnU-Net does when its
        trainer turns mirroring off, such a run validates and stores ``mirror: false``.

        Args:
            cfg: the run's configuration (its ``evaluate`` and ``train.augment``).
        """
        e = cfg.evaluate
        return cls(mirror=e.mirror and cfg.train.augment, overlap=e.overlap, mode=e.mode, sw_batch_size=e.sw_batch_size,
                   precision=e.precision)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> InferenceSettings:
        """Inverse of :meth:`to_dict`; missing keys take the defaults (older checkpoints).

        A checkpoint from before ``precision`` was validated in float32 and keeps it.

        Args:
            data: the stored settings.
        """
        data = dict(data or {})
        defaults = cls()
        return cls(
            mirror=bool(data.get("mirror", defaults.mirror)),
            overlap=float(data.get("overlap", defaults.overlap)),
            mode=str(data.get("mode", defaults.mode)),
            sw_batch_size=int(data.get("sw_batch_size", defaults.sw_batch_size)),
            postprocessing=Postprocessing.from_dict(data.get("postprocessing")),
            precision=str(data.get("precision", "float32")),
        )

    def window(self, **extra: Any) -> WindowSettings:
        """The sliding-window engine's settings.

        Args:
            extra: further :class:`WindowSettings` fields (placement, memory cap, compile).
        """
        return WindowSettings(overlap=self.overlap, mode=self.mode, mirror=self.mirror,  # type: ignore[arg-type]
                              batch_size=self.sw_batch_size, precision=self.precision, **extra)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Overrides:
    """Explicit changes to a model's stored settings (``None``: keep the model's).

    Args:
        mirror: ``--mirror`` / ``--no-mirror``.
        overlap: ``--overlap``.
        mode: ``--mode``.
        sw_batch_size: ``--sw-batch-size``.
        postprocess: ``--postprocess`` / ``--no-postprocess`` (off: raw argmax).
        memory_cap_gb: ``--device-memory-gb``: cap the device memory (fallback paths).
        compile: ``--compile auto|on|off`` (CPU).
        precision: ``--precision auto|float32|bfloat16`` (CPU).
        model_cache_max_gb: the model cache's cap, ``registry.model_cache_max_gb`` of ``--config`` (not a
            model setting: the machine's; the default when no config is given).
        compiled_cache_max_gb: the compiled-network cache's cap, ``registry.compiled_cache_max_gb`` likewise.
    """

    mirror: bool | None = None
    overlap: float | None = None
    mode: str | None = None
    sw_batch_size: int | None = None
    postprocess: bool | None = None
    memory_cap_gb: float | None = None
    compile: str | None = None
    precision: str | None = None
    model_cache_max_gb: float | None = RegistryConfig.model_cache_max_gb
    compiled_cache_max_gb: float | None = RegistryConfig.compiled_cache_max_gb

    def apply(self, settings: InferenceSettings) -> InferenceSettings:
        """``settings`` with the given overrides.

        Args:
            settings: a model's stored settings.
        """
        changes: dict[str, Any] = {k: getattr(self, k) for k in ("mirror", "overlap", "mode", "sw_batch_size", "precision")
                                   if getattr(self, k) is not None}
        if self.postprocess is False:
            changes["postprocessing"] = Postprocessing()
        return dataclasses.replace(settings, **changes)

    def engine(self) -> dict[str, Any]:
        """Engine-only fields for :meth:`InferenceSettings.window`."""
        out: dict[str, Any] = {"compiled_cache_max_gb": self.compiled_cache_max_gb}
        if self.memory_cap_gb is not None:
            out["memory_cap_gb"] = self.memory_cap_gb
        if self.compile is not None:
            out["compile"] = self.compile
        return out


def inference_section(settings: InferenceSettings, plan: Mapping[str, Any], validated: bool) -> dict[str, Any]:
    """The ``inference`` section of a checkpoint.

    Args:
        settings: the settings to store.
        plan: the plan (label names).
        validated: whether the postprocessing was decided on validation cases.
    """
    return {**settings.to_dict(), "label_names": {str(k): v for k, v in plan["labels"].items()},
            "package_version": package_version(), "validated": validated}
