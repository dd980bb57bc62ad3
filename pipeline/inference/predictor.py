"""Segmenting raw scans: preprocessing, the sliding-window engine, inversion to the input's grid, postprocessing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Invertd

from pipeline.data import mirror_swaps
from pipeline.inference.model import LoadedModel
from pipeline.inference.settings import Overrides
from pipeline.inference.sliding_window import SlidingWindowInferer
from pipeline.inference.stitching import class_argmax
from pipeline.quality import (
    Calibration,
    Conformity,
    MaskAgreement,
    case_record,
    check_conformity,
    mean_agreement,
    quality_signals,
)
from transforms.preprocessing import preprocessing


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the class axis, in place (a CT-sized volume's logits are hundreds of MB)."""
    logits.sub_(logits.amax(0, keepdim=True)).exp_()
    return logits.div_(logits.sum(0, keepdim=True))


def _drop_last_class(probs: torch.Tensor) -> torch.Tensor:
    """``probs`` without its last class, that class's memory given back (the storage shrinks in place).

    Only for a contiguous tensor that nothing else reads afterwards: every view of it sees the
    shrunk storage. Otherwise the slice, and the memory stays.
    """
    rest = probs[:-1]
    if probs.is_contiguous() and probs.storage_offset() == 0:
        probs.untyped_storage().resize_(rest.numel() * rest.element_size())
    return rest


@dataclass
class CasePrediction:
    """One case's prediction on the input's own voxel grid.

    Args:
        labels: the label map (uint8), post-processed as set.
        affine: the input's RAS affine.
        probabilities: ``(num_classes, *spatial)`` float32 softmax, when asked for.
        signals: label value -> quality signals (:func:`pipeline.quality.quality_signals`), when asked for.
        conformity: the input compared with the training fingerprint, when asked for.
        view: the image's first channel and the label map on the network's grid, with its spacing:
            what a review thumbnail shows (when asked for).
    """

    labels: np.ndarray
    affine: np.ndarray
    probabilities: np.ndarray | None = None
    signals: dict[int, dict[str, float]] | None = None
    conformity: Conformity | None = None
    view: tuple[np.ndarray, np.ndarray, list[float]] | None = None


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
            SlidingWindowInferer(m.network, m.patch_size, s.window(**self.overrides.engine()), device,
                                 label_swaps=mirror_swaps(m.plan))
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

    @property
    def calibration(self) -> Calibration | None:
        """The quality-estimate calibration of the (first) model."""
        return self.models[0].calibration

    def record(
        self, name: str, result: CasePrediction, model: Mapping[str, str], files: Mapping[str, str | None],
        min_expected_dice: float | None = None,
    ) -> dict[str, Any]:
        """The case record (``CASE.json``) of a prediction made with ``quality=True``.

        Args:
            name: the case's name.
            result: from :meth:`predict_loaded` with ``quality=True``.
            model: ``name`` and ``version`` of the model.
            files: output kind (``mask``, ``seg``, ``sr``) -> file name.
            min_expected_dice: the review threshold (``None``: the model's).
        """
        assert result.conformity is not None, "predict with quality=True"
        names = {v: n for v, n in self.labels.items() if v != 0}
        return case_record(name, result.labels, result.affine, names, result.signals, self.calibration,
                           result.conformity, model, self.settings[0].to_dict(), files, min_expected_dice)

    def _probabilities(
        self, image: torch.Tensor, spread: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, dict[int, float]]]:
        """Softmax averaged over the models, the spread of all their passes' logits (see ``with_spread``) and, with
        ``spread``, the agreement of the members' masks (``agreement``: each model's mirrored passes, averaged over
        the models; ``agreement_members``: the models' own masks, for an ensemble)."""
        n = len(self.engines)
        values = [v for v in self.labels if v != 0]
        probs = squares = logit_sum = sd = None
        passes: list[dict[int, float]] = []
        members = MaskAgreement() if spread and n > 1 else None
        for engine in self.engines:
            if not spread:
                logits = engine(image)
            else:
                mirrored = MaskAgreement()
                logits, sd = engine.with_spread(image, agreement=mirrored)
                passes.append(mirrored.dice(values))
                del mirrored  # its label maps (one byte a voxel per pass) before the next model's
                if members is not None:
                    members.add(class_argmax(logits))  # the argmax of the logits is the argmax of their softmax
                if n > 1:
                    # Pooled over the models: E|l|^2 - |E l|^2 over every pass of every model.
                    part = sd.square_()
                    for channel in logits:  # a class at a time: no second copy of the logits
                        part.addcmul_(channel, channel)
                    squares = part if squares is None else squares.add_(part)
                    logit_sum = logits.clone() if logit_sum is None else logit_sum.add_(logits)
            p = _softmax_(logits)  # in place: the logits are gone from here on
            probs = p if probs is None else probs.add_(p)
        assert probs is not None
        agreements: dict[str, dict[int, float]] = {}
        if spread:
            agreements["agreement"] = mean_agreement(passes)
            if members is not None:
                agreements["agreement_members"] = members.dice(values)
        if n == 1:
            return probs, sd, agreements
        probs /= n
        if squares is None or logit_sum is None:
            return probs, None, agreements
        squares.div_(n).sub_(logit_sum.div_(n).square().sum(0))
        return probs, squares.clamp_(min=0).sqrt_(), agreements

    @torch.inference_mode()
    def predict_loaded(
        self, d: dict[str, Any], probabilities: bool = False, postprocess: bool = True, quality: bool = False,
    ) -> CasePrediction:
        """Segment one preprocessed case (from :meth:`load`).

        Args:
            d: the preprocessed case.
            probabilities: also return the class probabilities on the input's grid.
            postprocess: apply the postprocessing decision (off: raw argmax).
            quality: also compute the quality signals, the input check and the review view.
        """
        image = d["image"]
        probs, spread, agreements = self._probabilities(image.as_tensor(), spread=quality)
        extra: dict[str, Any] = {}
        if quality:
            extra = self._quality(d, probs, spread, postprocess, agreements)
        del spread  # not needed past the signals: a volume less during the inversion
        raw, probs_out = self._invert(d, probs, probabilities)
        labels = self.postprocessing.apply(raw) if postprocess and self.postprocessing.active else raw
        affine = np.asarray(image.meta["original_affine"], dtype=np.float64)
        return CasePrediction(labels, affine, probs_out, **extra)

    def _invert(self, d: dict[str, Any], probs: torch.Tensor, keep: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """The label map on the input's grid (and the probabilities, when ``keep``), one class at a time.

        MONAI's inversion resamples through a sampling grid of three coordinates per output voxel
        (built from a four-coordinate one) and copies at each step: for all classes at once, 1.3 GB
        above the probabilities on a whole CT. Class by class, last class first, with a running
        maximum; each inverted class's share of ``probs`` is given back before the next resampling
        (``probs`` is used up). Each class is resampled on its own either way, so the probabilities
        and the label map are MONAI's (ties go to the lower class, as ``argmax``).
        """
        image = d["image"]
        best: torch.Tensor | None = None
        labels = kept = None
        for c in reversed(range(probs.shape[0])):
            channel = image.__class__(probs[c:c + 1], meta=image.meta, applied_operations=image.applied_operations)
            inverted = self.invert({**d, "pred": channel})["pred"].as_tensor()[0]
            del channel
            if inverted.untyped_storage().data_ptr() == probs.untyped_storage().data_ptr():
                inverted = inverted.clone()  # nothing to invert (same grid): MONAI hands back the input itself
            if c:
                probs = _drop_last_class(probs)
            if keep:
                if kept is None:
                    kept = np.empty((c + 1, *inverted.shape), dtype=np.float32)
                kept[c] = inverted.numpy()
            if best is None or labels is None:
                best, labels = inverted, torch.full(inverted.shape, c, dtype=torch.uint8)  # MONAI's output: ours
                continue
            better = inverted >= best
            labels[better] = c
            torch.maximum(best, inverted, out=best)
            del inverted, better  # before the next class's resampling, not after it
        assert labels is not None
        return labels.numpy(), kept

    def _quality(self, d: dict[str, Any], probs: torch.Tensor, spread: torch.Tensor | None,
                 postprocess: bool, agreements: dict[str, dict[int, float]] | None = None) -> dict[str, Any]:
        """Signals, input check and review view of one case, on the network's grid (before inversion)."""
        image = d["image"]
        net_labels = class_argmax(probs)
        values = [v for v in self.labels if v != 0]
        # The training volumes travel in the plan's fingerprint; a model saved before them gets volume_z NaN.
        volumes = (self.plan.get("fingerprint") or {}).get("volumes")
        signals = quality_signals(probs, net_labels, spread, values, volumes, agreements)
        view_labels = net_labels.numpy()
        if postprocess and self.postprocessing.active:
            view_labels = self.postprocessing.apply(view_labels)
        meta = image.meta
        conformity = check_conformity(self.plan.get("fingerprint"), np.asarray(meta["original_affine"]),
                                      [int(s) for s in meta["spatial_shape"]], image.as_tensor().numpy(),
                                      meta.get("modality"))
        spacing = [float(s) for s in self.plan["target_spacing"]]
        return {"signals": signals, "conformity": conformity, "view": (image.as_tensor()[0].numpy(), view_labels, spacing)}

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
