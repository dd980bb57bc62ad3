"""A small model that carries a quality calibration, for tests of what reads the estimates (the worklist).

Untrained (seconds per case) and calibrated by hand: each structure's estimated Dice grows with the logarithm of
its predicted volume, so the cases of a batch get different estimates and the order is known from their records.
"""

from __future__ import annotations

import math
from pathlib import Path

from tests.conftest import save_untrained_2mm_model

#: The structures of the model (label 1 first), named as the hippocampus configs name them.
STRUCTURES = ["Anterior", "Posterior"]


def save_calibrated_model(path: Path, min_expected_dice: float = 0.58) -> Path:
    """Write the model: the seeded untrained 2 mm U-Net of the PACS tests, with a calibration on ``voxels``.

    Args:
        path: the checkpoint to write (its file name is the model version a prediction records).
        min_expected_dice: the review threshold (cases below it are flagged).
    """
    from pipeline.inference.checkpoints import load_checkpoint, save_checkpoint

    save_untrained_2mm_model(path)
    ckpt = load_checkpoint(path)
    ckpt["plan"]["labels"] = {"0": "background", **{str(v): n for v, n in enumerate(STRUCTURES, start=1)}}
    # Around the voxel counts this model predicts on the hippocampus cases at 2 mm (about 7300 and 650): estimates
    # spread over a few hundredths to a tenth.
    fits = {str(value): {"features": ["voxels"], "mean": [math.log(typical)], "scale": [1.0], "weights": [weight],
                         "intercept": 0.6, "presence": 1.0}
            for value, typical, weight in ((1, 7300.0, 1.0), (2, 650.0, 0.5))}
    ckpt["inference"] = {**ckpt.get("inference", {}), "quality": {
        "labels": fits, "min_expected_dice": min_expected_dice, "validation": {}}}
    save_checkpoint({k: v for k, v in ckpt.items() if k != "format"}, path)
    return path
