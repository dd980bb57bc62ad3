"""The training patches of every epoch as one seeded stream, and the loader over it.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
)
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from pipeline import cpus


def _collate_patches(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    items = [s for sample in batch for s in (sample if isinstance(sample, list) else [sample])]
    image = torch.stack([torch.as_tensor(s["image"]) for s in items])
    label = torch.stack([torch.as_tensor(s["label"]) for s in items])
    return image, label


class PatchStream(TorchDataset):
    """The training patches of every epoch as one indexable stream; sample ``g`` depends on ``g`` alone.

    Sample ``g`` is patch ``i = g % per_epoch`` of epoch ``g // per_epoch``: its case
    and its augmentation are drawn from seeds of the epoch and ``i``, never from
    a process's RNG. So one ``DataLoader`` (workers started once, prefetching
    across epoch ends) yields the same patches whatever the number of workers,
    and a resumed run, which starts the stream at its epoch, repeats exactly
    the patches an uninterrupted run would have seen.

    Args:
        cases: preprocessed ``image``/``label`` tensors.
        transforms: crop and augmentation chain.
        seed: the run's seed (``train.seed``).
        rank: this process's rank (each DDP process draws its own patches).
        per_epoch: samples per epoch (iterations times batch size).
    """

    def __init__(self, cases: Sequence[dict], transforms: Compose, seed: int, rank: int, per_epoch: int) -> None:
        self.cases, self.transforms, self.seed, self.rank, self.per_epoch = cases, transforms, seed, rank, per_epoch
        self._local = threading.local()
        self._picks: dict[int, np.ndarray] = {}

    def epoch_picks(self, epoch: int) -> np.ndarray:
        """The case index of each sample of ``epoch``.

        Args:
            epoch: the epoch (0-based).
        """
        if epoch not in self._picks:
            self._picks = {epoch: np.random.RandomState(_epoch_seed(self.seed, epoch, self.rank)).randint(
                0, len(self.cases), size=self.per_epoch)}
        return self._picks[epoch]

    def __len__(self) -> int:
        return 2**62  # unbounded: the sampler says which epochs are drawn

    def __getitem__(self, g: int) -> Any:
        if not hasattr(self._local, "transforms"):
            self._local.transforms = copy.deepcopy(self.transforms)
        epoch, i = divmod(int(g), self.per_epoch)
        tf = self._local.transforms
        tf.set_random_state(seed=(_epoch_seed(self.seed, epoch, self.rank) + i) % 2**32)
        return tf(self.cases[self.epoch_picks(epoch)[i]])


def patch_loader(
    stream: PatchStream, first_epoch: int, last_epoch: int, batch_size: int, workers: int, pin_memory: bool,
) -> DataLoader:
    """One loader over epochs ``[first_epoch, last_epoch)`` of a patch stream.

    Args:
        stream: the patch stream.
        first_epoch: the first epoch to draw (the resumed epoch).
        last_epoch: one past the last epoch.
        batch_size: patches per batch (``stream.per_epoch`` is a multiple of it).
        workers: worker processes (0: augment in this process).
        pin_memory: page-lock batches for a fast copy to the GPU.
    """
    sampler = range(first_epoch * stream.per_epoch, last_epoch * stream.per_epoch)
    return DataLoader(
        stream, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=_collate_patches,
        pin_memory=pin_memory, prefetch_factor=4 if workers else None,
        # Each worker is a process beside the training's threads: one thread each, or they oversubscribe the CPUs.
        worker_init_fn=cpus.single_threaded_worker if workers else None,
    )


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % 2**31
