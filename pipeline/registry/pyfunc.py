"""The MLflow flavour of a trained U-Net: a self-contained pyfunc that segments raw scans.

The registered model holds ``artifacts/checkpoint.pt`` (weights, architecture,
preprocessing plan and the inference settings it was validated with; for a fold
ensemble, every fold's, whose probabilities are averaged), this
project's code (``code/pipeline``, ``code/models``, ``code/transforms``: MLflow puts
them first on ``sys.path``) and pinned requirements, so it loads wherever those
requirements are installed, without this project. Loading never unpickles an
object: the network is rebuilt from stored arguments and its weights read with
``weights_only=True``.

``predict`` takes a raw scan, not preprocessed patches, and returns its label map on
the scan's own voxel grid, exactly as ``unet-pipeline predict`` does (same
preprocessing, sliding window, test-time mirroring and postprocessing):

* ``{"image": array, "affine": 4x4}``: ``(X, Y, Z)`` or ``(C, X, Y, Z)`` voxels in
  NIfTI/RAS convention (``nibabel``'s ``get_fdata()`` and ``affine``); or
* ``{"path": [...]}`` (or a DataFrame with a ``path`` column): one NIfTI file or DICOM
  series folder per channel of one case.

The answer is a ``uint8`` label map ``(X, Y, Z)``. The same JSON works against
``mlflow models serve``: ``{"inputs": {"image": [...], "affine": [...]}}``.

The per-case record (``"output": "measurements"``) names the model it came from as
``predict`` does: the registered name and version when MLflow loaded it by
``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` (an alias as the version it pointed to
then), ``run`` and the run id for ``runs:/``, else ``local`` and the folder's name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

#: Where a pyfunc predicts: ``UNET_DEVICE=cpu|cuda`` (default: CUDA when available).
DEVICE_ENV = "UNET_DEVICE"
#: What MLflow writes beside a model it downloads by a ``models:/`` name and version or alias.
REGISTERED_META = "registered_model_meta"


def model_identity(checkpoint: Path) -> dict[str, str]:
    """The name and version of the MLflow model holding ``checkpoint``, as ``predict`` names a model: the registered
    version that holds it where there is exactly one, else its run.

    Args:
        checkpoint: the model's ``artifacts/checkpoint.pt`` as MLflow loaded it.
    """
    import yaml

    folder = next((f for f in list(Path(checkpoint).parents)[:3] if (f / "MLmodel").is_file()), None)
    if folder is None:
        return {"name": "local", "version": Path(checkpoint).name}
    try:
        meta = yaml.safe_load((folder / REGISTERED_META).read_text()) or {}
    except (OSError, yaml.YAMLError):
        meta = {}
    if isinstance(meta, dict) and meta.get("model_name") and meta.get("model_version") is not None:
        return {"name": str(meta["model_name"]), "version": str(meta["model_version"])}
    try:
        mlmodel = yaml.safe_load((folder / "MLmodel").read_text()) or {}
        run_id, model_id = mlmodel.get("run_id"), mlmodel.get("model_id")
    except (OSError, yaml.YAMLError, AttributeError):
        run_id, model_id = None, None
    registered = _registered_version(str(run_id), model_id) if run_id else None
    if registered:
        return registered
    return {"name": "run", "version": str(run_id)} if run_id else {"name": "local", "version": folder.name}


def _registered_version(run_id: str, model_id: str | None) -> dict[str, str] | None:
    """The one registered version holding this run's model, asked of the registry (``None``: none, several, or no
    registry to ask).

    MLflow up to 3.17 wrote ``registered_model_meta`` beside a model downloaded by a ``models:/`` URI; 3.18
    writes nothing, so a downloaded model says only its run and logged-model id.

    Args:
        run_id: the MLmodel's ``run_id``.
        model_id: its ``model_id`` (MLflow 3's logged model), which narrows a run that logged several models.
    """
    try:
        versions = mlflow.MlflowClient().search_model_versions(f"run_id = '{run_id}'")
    except Exception:  # no registry reachable here: the run still names the model
        return None
    if model_id:
        versions = [v for v in versions if getattr(v, "model_id", None) in (None, model_id)]
    found = {(str(v.name), str(v.version)) for v in versions}
    if len(found) != 1:
        return None
    name, version = found.pop()
    return {"name": name, "version": version}


class UNetPyfunc(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper: a raw scan in, its label map on the scan's grid out."""

    def load_context(self, context: Any) -> None:
        """Rebuild the network(s) and their predictor from the logged checkpoint (a fold ensemble: every fold).

        Args:
            context: MLflow's model context holding ``artifacts["checkpoint"]``.
        """
        from pipeline.inference import Predictor, load_models
        from pipeline.training import resolve_device

        device = resolve_device(os.environ.get(DEVICE_ENV, "auto"))
        self.models = load_models(Path(context.artifacts["checkpoint"]), device)
        self.model = self.models[0]
        self.predictor = Predictor(self.models, device)
        self.identity = model_identity(Path(context.artifacts["checkpoint"]))

    # MLflow reads a ``model_input`` annotation as a data schema (it must be list[...]) and warns
    # at import and at log_model whether there is one or not; ours is a dict of arrays or paths, so
    # no annotation and no schema validation (the flag MLflow's own ChatModel uses).
    _skip_type_hint_validation = True

    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> np.ndarray:  # noqa: ANN001
        """Label map of one raw scan.

        Args:
            context: MLflow's model context (unused).
            model_input: ``{"image", "affine"}`` arrays, or ``{"path": [...]}`` / a DataFrame with a ``path`` column;
                with ``"output": "measurements"`` the case record (volumes per label in mL, estimated Dice,
                review flag and reasons: ``CASE.json``'s content) is returned instead of the label map.
            params: unused.
        """
        if hasattr(model_input, "columns"):  # a pandas DataFrame
            model_input = {c: model_input[c].tolist() for c in model_input.columns}
        if not isinstance(model_input, dict):
            raise ValueError("input must be {'image': array, 'affine': 4x4 array} or {'path': [files or folders]}")
        # A key of the input, not a param: params need a signature, which this model cannot have (see registration).
        model_input = dict(model_input)
        measurements = str(np.ravel(model_input.pop("output", ["labels"]))[0]) == "measurements"
        if "path" in model_input:
            paths = [str(p) for p in np.atleast_1d(np.asarray(model_input["path"], dtype=object)).ravel()]
            return self._measure(paths) if measurements else self.predictor(paths)[0]
        image = np.asarray(model_input["image"], dtype=np.float32)
        affine = np.asarray(model_input["affine"], dtype=np.float64).reshape(4, 4)
        channels = len(self.model.plan["modalities"])
        if image.ndim == 3 and channels == 1:
            image = image[None]
        if image.ndim != 4 or image.shape[0] != channels:
            raise ValueError(f"image must be (X, Y, Z) or ({channels}, X, Y, Z), got shape {image.shape}")
        import nibabel as nib

        # The same path as `predict` on a NIfTI file: the scan goes through the identical reader and chain.
        with tempfile.TemporaryDirectory(prefix="unet-pyfunc-") as tmp:
            files = []
            for c in range(channels):
                path = Path(tmp) / f"scan_{c:04d}.nii.gz"
                nifti = nib.Nifti1Image(image[c], affine)
                nifti.set_qform(affine, code=1)
                nifti.set_sform(affine, code=1)
                nib.save(nifti, path)
                files.append(path)
            return self._measure(files) if measurements else self.predictor(files)[0]

    def _measure(self, paths: list) -> dict[str, Any]:  # noqa: ANN001
        """The case record ``predict`` writes as ``CASE.json``: volumes, estimated Dice, flag and reasons."""
        result = self.predictor.predict_loaded(self.predictor.load(paths), quality=True)
        return self.predictor.record("input", result, self.identity, {})


def requirements() -> list[str]:
    """Pinned requirements of the model's code (the versions it was trained and validated with).

    Only the public release is pinned (``torch==2.14.1``, not a local build such as
    ``+cpu``), so that pip can install it on any platform.
    """
    from importlib import metadata

    pins = []
    for name in ("torch", "monai", "numpy", "scipy", "nibabel", "pydicom", "SimpleITK", "highdicom", "mlflow",
                 "pyyaml", "tqdm"):
        try:
            version = metadata.version(name).split("+")[0]
        except metadata.PackageNotFoundError:
            continue
        pins.append(f"{name}=={version}")
    return pins


def code_paths() -> list[str]:
    """The project's package folders the model ships (``code/...`` in the MLflow model)."""
    root = Path(__file__).resolve().parents[2]
    return [str(root / name) for name in ("pipeline", "models", "transforms")]
