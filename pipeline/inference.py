"""Models as they are handed over: weights, plan and the inference settings they were validated with.

A checkpoint carries, besides its weights and preprocessing plan, an ``inference``
section: mirroring, overlap, blending, windows per batch, the postprocessing
decision, label names and the package version. :class:`Predictor` uses those by
default, so ``predict`` and ``evaluate`` give exactly what was validated; explicit
overrides (CLI flags) change one setting at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Invertd

from models.unet import UNet
from pipeline.checkpoints import load_checkpoint
from pipeline.postprocessing import Postprocessing
from pipeline.sliding_window import SlidingWindowInferer, WindowSettings
from transforms.preprocessing import preprocessing


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
        postprocessing: the keep-largest-component decision (see :mod:`pipeline.postprocessing`).
    """

    mirror: bool = True
    overlap: float = 0.5
    mode: str = "gaussian"
    sw_batch_size: int = 4
    postprocessing: Postprocessing = field(default_factory=Postprocessing)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the checkpoint, MLflow and JSON."""
        return {"mirror": self.mirror, "overlap": self.overlap, "mode": self.mode, "sw_batch_size": self.sw_batch_size,
                "postprocessing": self.postprocessing.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> InferenceSettings:
        """Inverse of :meth:`to_dict`; missing keys take the defaults (older checkpoints).

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
        )

    def window(self, **extra: Any) -> WindowSettings:
        """The sliding-window engine's settings.

        Args:
            extra: further :class:`WindowSettings` fields (placement, memory cap, compile).
        """
        return WindowSettings(overlap=self.overlap, mode=self.mode, mirror=self.mirror,  # type: ignore[arg-type]
                              batch_size=self.sw_batch_size, **extra)


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
    """

    mirror: bool | None = None
    overlap: float | None = None
    mode: str | None = None
    sw_batch_size: int | None = None
    postprocess: bool | None = None
    memory_cap_gb: float | None = None
    compile: str | None = None

    def apply(self, settings: InferenceSettings) -> InferenceSettings:
        """``settings`` with the given overrides.

        Args:
            settings: a model's stored settings.
        """
        changes: dict[str, Any] = {k: getattr(self, k) for k in ("mirror", "overlap", "mode", "sw_batch_size")
                                   if getattr(self, k) is not None}
        if self.postprocess is False:
            changes["postprocessing"] = Postprocessing()
        return dataclasses.replace(settings, **changes)

    def engine(self) -> dict[str, Any]:
        """Engine-only fields for :meth:`InferenceSettings.window`."""
        out: dict[str, Any] = {}
        if self.memory_cap_gb is not None:
            out["memory_cap_gb"] = self.memory_cap_gb
        if self.compile is not None:
            out["compile"] = self.compile
        return out


@dataclass
class LoadedModel:
    """A network with the preprocessing plan and inference settings it was trained and validated with.

    Args:
        network: the U-Net, in evaluation mode.
        plan: the preprocessing plan (orientation, spacing, normalisation, labels).
        patch_size: the training patch size (the window).
        settings: the stored inference settings.
        checkpoint: the checkpoint metadata (without weights).
    """

    network: UNet
    plan: dict[str, Any]
    patch_size: list[int]
    settings: InferenceSettings
    checkpoint: dict[str, Any]

    @property
    def labels(self) -> dict[int, str]:
        """Label value -> name, background included."""
        return {int(k): v for k, v in self.plan["labels"].items()}


def load_model(path: Path, device: torch.device) -> LoadedModel:
    """Build the U-Net of a checkpoint and load its weights (``weights_only=True``).

    Args:
        path: a ``.pt`` checkpoint written by the train or run stage.
        device: where to put the network.
    """
    return load_model_from_checkpoint(load_checkpoint(path), device)


def load_model_from_checkpoint(ckpt: Mapping[str, Any], device: torch.device) -> LoadedModel:
    """Build the U-Net of an already loaded checkpoint (see :func:`load_model`).

    Args:
        ckpt: the checkpoint's content.
        device: where to put the network.
    """
    network = UNet(**ckpt["model"])
    network.load_state_dict(ckpt["state_dict"])
    network.to(device).eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer", "scaler", "torch_rng")}
    settings = InferenceSettings.from_dict(ckpt.get("inference"))
    return LoadedModel(network, ckpt["plan"], list(ckpt["patch_size"]), settings, meta)


def inference_section(settings: InferenceSettings, plan: Mapping[str, Any], validated: bool) -> dict[str, Any]:
    """The ``inference`` section of a checkpoint.

    Args:
        settings: the settings to store.
        plan: the plan (label names).
        validated: whether the postprocessing was decided on validation cases.
    """
    return {**settings.to_dict(), "label_names": {str(k): v for k, v in plan["labels"].items()},
            "package_version": package_version(), "validated": validated}


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the class axis, in place (a CT-sized volume's logits are hundreds of MB)."""
    logits.sub_(logits.amax(0, keepdim=True)).exp_()
    return logits.div_(logits.sum(0, keepdim=True))


@dataclass
class CasePrediction:
    """One case's prediction on the input's own voxel grid.

    Args:
        labels: the label map (uint8), post-processed as set.
        affine: the input's RAS affine.
        probabilities: ``(num_classes, *spatial)`` float32 softmax, when asked for.
    """

    labels: np.ndarray
    affine: np.ndarray
    probabilities: np.ndarray | None = None


class Predictor:
    """Segment input images with one or more models (their softmax outputs averaged).

    Each input goes through the models' preprocessing chain and our sliding-window
    engine; the class probabilities are mapped back through the inverse reorientation
    and resampling (linear), then the label map is taken and post-processed, so the
    output lies on the input's own voxel grid with the input's affine.

    Settings: each model predicts with its own stored settings (with ``overrides``);
    an ensemble is post-processed as its first model was validated.

    Args:
        models: loaded models sharing one preprocessing plan (e.g. the folds of a run).
        device: where the networks run.
        overrides: explicit changes to the stored settings.
        series_uid: the DICOM series to read from folders holding several.
    """

    def __init__(
        self, models: Sequence[LoadedModel], device: torch.device, overrides: Overrides | None = None,
        series_uid: str | None = None,
    ) -> None:
        self.models = list(models)
        self.plan = self.models[0].plan
        self.device = device
        self.overrides = overrides or Overrides()
        self.settings = [self.overrides.apply(m.settings) for m in self.models]
        self.postprocessing = self.settings[0].postprocessing
        self.engines = [
            SlidingWindowInferer(m.network, m.patch_size, s.window(**self.overrides.engine()), device)
            for m, s in zip(self.models, self.settings)
        ]
        self.chain = preprocessing(self.plan, with_label=False, series_uid=series_uid)
        self.invert = Invertd(keys="pred", transform=self.chain, orig_keys="image", nearest_interp=False)

    @property
    def labels(self) -> dict[int, str]:
        """Label value -> name, background included."""
        return self.models[0].labels

    def expect(self, volumes: int) -> None:
        """Tell the engines how many volumes this job will predict (lets them decide to compile).

        Args:
            volumes: the number of cases still to come.
        """
        for engine in self.engines:
            engine.volumes_left = max(1, volumes)

    def load(self, images: Sequence[str | Path]) -> dict[str, Any]:
        """Read and preprocess one case (what :meth:`iter_loaded` runs ahead in a thread).

        Args:
            images: one path per channel (NIfTI file or DICOM folder).
        """
        return self.chain({"image": [str(p) for p in images]})

    def iter_loaded(self, cases: Iterable[Sequence[str | Path]], prefetch: bool | None = None) -> Iterator[Any]:
        """Preprocessed cases in order; with ``prefetch`` the next is read while the current one is predicted.

        A case that fails to load yields its exception (not raised), so a batch can go on.

        Args:
            cases: one list of channel paths per case.
            prefetch: read ahead in a background thread (default: on CUDA, where the device
                would otherwise wait for the disk).
        """
        cases = list(cases)
        self.expect(len(cases))
        if prefetch is None:
            prefetch = self.device.type == "cuda"

        def safe_load(images: Sequence[str | Path]) -> Any:
            try:
                return self.load(images)
            except Exception as error:  # handed to the caller in order, with its traceback
                return error

        if not prefetch or len(cases) < 2:
            for images in cases:
                yield safe_load(images)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
            pending = pool.submit(safe_load, cases[0])
            for nxt in [*cases[1:], None]:
                loaded = pending.result()
                if nxt is not None:
                    pending = pool.submit(safe_load, nxt)
                yield loaded

    @torch.inference_mode()
    def predict_loaded(self, d: dict[str, Any], probabilities: bool = False, postprocess: bool = True) -> CasePrediction:
        """Segment one preprocessed case (from :meth:`load`).

        Args:
            d: the preprocessed case.
            probabilities: also return the class probabilities on the input's grid.
            postprocess: apply the postprocessing decision (off: raw argmax).
        """
        image = d["image"]
        probs = None
        for engine in self.engines:
            p = _softmax_(engine(image.as_tensor()))
            probs = p if probs is None else probs.add_(p)
        assert probs is not None
        if len(self.engines) > 1:
            probs /= len(self.engines)
        d = {**d, "pred": image.__class__(probs, meta=image.meta, applied_operations=image.applied_operations)}
        inverted = self.invert(d)["pred"]
        raw = torch.argmax(inverted, dim=0).numpy().astype(np.uint8)
        labels = self.postprocessing.apply(raw) if postprocess and self.postprocessing.active else raw
        affine = np.asarray(image.meta["original_affine"], dtype=np.float64)
        probs_out = inverted.as_tensor().numpy().astype(np.float32) if probabilities else None
        return CasePrediction(labels, affine, probs_out)

    def __call__(self, images: Sequence[str | Path], postprocess: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Segment one case.

        Args:
            images: one path per channel (NIfTI file or DICOM folder).
            postprocess: apply the postprocessing decision.

        Returns:
            The label map (uint8, the input's spatial shape) and the input's affine (RAS).
        """
        result = self.predict_loaded(self.load(images), postprocess=postprocess)
        return result.labels, result.affine
