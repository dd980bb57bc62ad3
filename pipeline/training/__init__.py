"""Training: patches and augmentation, the loss, the loop with its checkpoints and time budget, DDP, the device.

Trains a U-Net on preprocessed cases and writes the checkpoints inference reads. It
may import ``pipeline.data``, ``pipeline.inference`` (the engine validates during
training and the checkpoint stores its settings, as nnU-Net's trainer uses its
predictor) and ``pipeline.evaluation`` (the Dice), never registry, scheduling or pacs.
"""

from pipeline.training import distributed
from pipeline.training.devices import resolve_device
from pipeline.training.loop import TrainResult, train

__all__ = ["TrainResult", "distributed", "resolve_device", "train"]
