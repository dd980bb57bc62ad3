"""The MLflow flavour of a trained U-Net: a pyfunc around a weights-only checkpoint.

The registered artifact holds ``artifacts/checkpoint.pt`` (state dict, architecture
and preprocessing plan). Loading never unpickles a model object: the network is
rebuilt from the stored arguments and its weights read with ``weights_only=True``.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np
import torch
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import Schema, TensorSpec


class UNetPyfunc(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper: input ``(N, C, *spatial)`` float32 preprocessed patches, output ``(N, *spatial)`` labels."""

    def load_context(self, context: Any) -> None:
        """Rebuild the network from the logged checkpoint.

        Args:
            context: MLflow's model context holding ``artifacts["checkpoint"]``.
        """
        from pipeline.devices import resolve_device
        from pipeline.inference import load_model

        self.device = resolve_device("auto")
        self.model = load_model(context.artifacts["checkpoint"], self.device)

    def predict(
        self, context: Any, model_input: np.ndarray | dict[str, np.ndarray], params: dict[str, Any] | None = None
    ) -> np.ndarray:
        """Label map of already preprocessed input.

        Args:
            context: MLflow's model context (unused).
            model_input: ``(N, C, *spatial)`` float32 array (or ``{"image": array}``).
            params: unused.
        """
        if isinstance(model_input, dict):  # MLflow passes named tensor inputs as {"image": array}
            model_input = model_input["image"]
        with torch.no_grad():
            logits = self.model.network(torch.as_tensor(np.asarray(model_input, np.float32), device=self.device))
        return torch.argmax(logits, 1).to(torch.uint8).cpu().numpy()


def signature(in_channels: int, spatial_dims: int) -> ModelSignature:
    """Tensor signature with free batch and spatial sizes.

    Args:
        in_channels: input channels.
        spatial_dims: 2 or 3.
    """
    spatial = (-1,) * spatial_dims
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, in_channels, *spatial), "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *spatial), "labels")]),
    )
