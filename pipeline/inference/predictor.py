"""Segmenting raw scans: preprocessing, the sliding-window engine, inversion to the input's grid, postprocessing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Invertd

from pipeline.inference.model import LoadedModel
from pipeline.inference.settings import Overrides
from pipeline.inference.sliding_window import SlidingWindowInferer
from transforms.preprocessing import preprocessing


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
