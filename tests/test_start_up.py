"""What a process pays before its first voxel: the pipeline imports MONAI without the extras it never uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HIPPOCAMPUS = REPO.parent / "shared" / "data" / "hippocampus" / "imagesTr"

PROBE = """
import json, sys
import pipeline
import monai
from monai.transforms import LoadImage
loaded = sorted(n for n in ("mlflow", "pandas", "matplotlib.pyplot", "scipy.signal", "sklearn") if n in sys.modules)
image = LoadImage(image_only=True)(sys.argv[1]) if len(sys.argv) > 1 else None
import mlflow, pandas, matplotlib.pyplot, scipy.signal, sklearn  # still importable afterwards, for our own code
print(json.dumps({"loaded_with_monai": loaded, "shape": list(image.shape) if image is not None else None,
                  "mlflow": mlflow.__version__, "pandas_frame": int(pandas.DataFrame({"a": [1, 2]})["a"].sum())}))
"""


def _probe(*args: str, **env: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **env}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_monai_is_imported_without_the_extras_it_never_uses_here() -> None:
    images = sorted(HIPPOCAMPUS.glob("*.nii.gz"))
    if not images:
        pytest.skip(f"shared data absent: {HIPPOCAMPUS}")
    lean = _probe(str(images[0]))
    assert lean["loaded_with_monai"] == [], "MONAI's import pulled in what predict does not need"
    assert lean["shape"] == list(__import__("nibabel").load(images[0]).shape)  # MONAI still reads the real file
    assert lean["pandas_frame"] == 3 and lean["mlflow"]  # and the extras still work for our own code
    full = _probe(UNET_PIPELINE_FULL_MONAI_IMPORT="1")
    assert set(full["loaded_with_monai"]) == {"mlflow", "pandas", "matplotlib.pyplot", "scipy.signal", "sklearn"}
