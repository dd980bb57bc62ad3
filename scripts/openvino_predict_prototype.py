"""`unet-pipeline predict` with OpenVINO serving the CPU network: the prototype behind docs/results.md's figure.

A measurement, not a feature: it replaces the engine's look-up of an ahead-of-time package
(:func:`pipeline.inference.accelerate.ahead_of_time`) with an OpenVINO model of the same network for the
same full window batch, converted once (``openvino.convert_model``) and kept as IR under ``--ir-cache``.
Everything else is ``predict`` unchanged. OpenVINO is not a dependency of the project::

    pip install openvino
    .venv/bin/python scripts/openvino_predict_prototype.py predict --model M CASES --out OUT --overwrite

``OPENVINO_IR_CACHE`` sets the IR folder (default ``/tmp/unet-openvino-ir``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.inference import accelerate, aot  # noqa: E402

_SERVED: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}


def ahead_of_time(network: torch.nn.Module, input_shape: Sequence[int],
                  precision: str = "float32") -> Callable[[torch.Tensor], torch.Tensor]:
    """The network as OpenVINO runs it for ``input_shape`` in ``precision``: float32 batch in, float32 logits out.

    Args:
        network: the float32 network, in evaluation mode.
        input_shape: the full window batch.
        precision: ``float32`` or ``bfloat16`` (OpenVINO's inference precision hint).
    """
    import openvino as ov

    key = aot.key_for(network, input_shape, "cpu", precision)
    name = f"{key.digest()}-{precision}"
    if name in _SERVED:
        return _SERVED[name]
    folder = Path(os.environ.get("OPENVINO_IR_CACHE", "/tmp/unet-openvino-ir"))
    path = folder / f"{key.digest()}.xml"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        model = ov.convert_model(network.eval(), example_input=torch.zeros(*input_shape))
        ov.save_model(model, str(path), compress_to_fp16=False)
    compiled = ov.Core().compile_model(str(path), "CPU", {
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bfloat16" else "f32",
        "INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    _SERVED[name] = lambda x: torch.from_numpy(np.array(request.infer([x.contiguous().numpy()])[0]))
    return _SERVED[name]


if __name__ == "__main__":
    accelerate.ahead_of_time = ahead_of_time  # type: ignore[assignment]
    from pipeline.cli import main

    sys.exit(main(sys.argv[1:]))
