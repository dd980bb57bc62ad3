"""The volumetric segmentation pipeline.

Importing the package installs one import hook, for start-up time: ``import monai`` imports
every MONAI submodule (``monai/__init__.py`` loads them all), and through MONAI's
``optional_import`` also MLflow (for MONAI's ``MLFlowHandler``), pandas (CSV datasets,
profiling), ``matplotlib.pyplot`` (``matshow3d``, the LR finder), ``scipy.signal`` (signal
transforms) and scikit-learn (an embedding metric): about 1.5 s and 150 MB of every process
(importing what ``predict`` needs: 2.7 s instead of 4.0-4.7 s on 2 cores), for MONAI features
the pipeline never calls. While MONAI's own import runs those names read
as absent, so MONAI keeps its "not installed" stand-ins for just those features; afterwards
they import as usual, for our code and anyone else's. Nothing changes if MONAI was imported
before the pipeline, or if one of them already was. ``UNET_PIPELINE_FULL_MONAI_IMPORT=1``
turns the hook off.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType

#: Imported by MONAI at import time only for features the pipeline does not use.
MONAI_EXTRAS_NOT_USED = ("mlflow", "pandas", "matplotlib.pyplot", "scipy.signal", "sklearn")


class _LeanMonaiLoader(importlib.abc.Loader):
    """MONAI's own loader, run with :data:`MONAI_EXTRAS_NOT_USED` reading as absent."""

    def __init__(self, real: importlib.abc.Loader) -> None:
        self.real = real

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.real.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        absent = [name for name in MONAI_EXTRAS_NOT_USED if name not in sys.modules]
        for name in absent:
            sys.modules[name] = None  # type: ignore[assignment]  # the import system's "known absent"
        try:
            self.real.exec_module(module)  # type: ignore[attr-defined]
        finally:
            for name in absent:
                if sys.modules.get(name, 0) is None:
                    del sys.modules[name]
            # Resource readers and the like ask the module's loader: hand MONAI back its own.
            module.__loader__ = self.real
            if module.__spec__ is not None:
                module.__spec__.loader = self.real


class _LeanMonaiFinder(importlib.abc.MetaPathFinder):
    """Finds ``monai`` as the path finders do, and wraps its loader once."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "monai":
            return None
        sys.meta_path.remove(self)  # one use: MONAI is imported once per process
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _LeanMonaiLoader(spec.loader)
        return spec


if "monai" not in sys.modules and os.environ.get("UNET_PIPELINE_FULL_MONAI_IMPORT", "") not in ("1", "true"):
    sys.meta_path.insert(0, _LeanMonaiFinder())
