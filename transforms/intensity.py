"""Intensity normalisation per channel, chosen by modality (nnU-Net's schemes)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, NormalizeIntensity

SCHEMES = ("zscore", "ct", "none")


class NormalizeChannelsd(MapTransform):
    """Normalise each channel of a channel-first image by its own scheme.

    - ``zscore`` (MRI): per volume, z-score inside the non-zero region.
    - ``ct``: clip to the dataset's foreground 0.5/99.5 percentiles, then z-score
      with the dataset's foreground mean and std (so HU keep one meaning
      across scans).
    - ``none``: leave as is.

    Args:
        keys: image keys to normalise.
        schemes: one scheme per channel.
        ct_stats: per channel, ``{"low", "high", "mean", "std"}`` from the
            fingerprint; needed for ``ct`` channels.
    """

    def __init__(
        self,
        keys: KeysCollection,
        schemes: Sequence[str],
        ct_stats: Sequence[Mapping[str, float] | None] | None = None,
    ) -> None:
        super().__init__(keys)
        unknown = set(schemes) - set(SCHEMES)
        if unknown:
            raise ValueError(f"unknown normalisation scheme(s) {sorted(unknown)}; known: {SCHEMES}")
        self.schemes = list(schemes)
        self.ct_stats = list(ct_stats or [None] * len(schemes))
        for scheme, stats in zip(self.schemes, self.ct_stats):
            if scheme == "ct" and not stats:
                raise ValueError("the 'ct' scheme needs dataset foreground statistics")
        self._zscore = NormalizeIntensity(nonzero=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] != len(self.schemes):
                raise ValueError(f"image has {img.shape[0]} channels but {len(self.schemes)} schemes are set")
            channels = []
            for c, scheme in enumerate(self.schemes):
                x = img[c : c + 1].float()
                if scheme == "zscore":
                    x = self._zscore(x)
                elif scheme == "ct":
                    s = self.ct_stats[c]
                    x = (x.clamp(s["low"], s["high"]) - s["mean"]) / max(s["std"], 1e-8)
                channels.append(x)
            out = torch.cat(channels, dim=0)
            if hasattr(img, "copy_meta_from"):
                out = type(img)(out, meta=img.meta, applied_operations=img.applied_operations)
            d[key] = out
        return d
