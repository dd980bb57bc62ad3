"""MLflow tracking and the model registry: where runs go, how models are registered and found."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import InputDataError, PipelineError
from pipeline.registry import model_cache
from pipeline.registry.server import redact_uri

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

CANDIDATE, CHAMPION = "candidate", "champion"
SELECTION_METRIC = "val_mean_dice"
MODEL_ARTIFACT = "model"
_uri_we_set: str | None = None


def quiet_mlflow() -> None:
    """MLflow and its database migrations log at INFO on every start; keep the console for our summary."""
    for name in ("mlflow", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # No input example on purpose (volumes are too big to store), and no signature: the pyfunc takes
    # either arrays with an affine or paths, which one tensor schema cannot say.
    warnings.filterwarnings("ignore", message=".*input example was not provided.*")
    warnings.filterwarnings("ignore", message=".*[Tt]ype hint.*")


def tracking_uri(configured: str | None, work_dir: Path) -> str:
    """The tracking URI: the config's, else ``MLFLOW_TRACKING_URI``, else SQLite in the work dir.

    Args:
        configured: ``mlflow.tracking_uri`` from the config (may be empty).
        work_dir: the run's work directory.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    # mlflow.set_tracking_uri() exports the variable too: only a value we did not set is the user's.
    uri = configured or (env if env != _uri_we_set else None)
    if uri:
        return uri
    return f"sqlite:///{(work_dir / 'mlflow.db').resolve()}"


def setup(configured_uri: str | None, work_dir: Path, experiment: str | None = None) -> str:
    """Point MLflow at the tracking store and select (or create) the experiment.

    With a local SQLite store the experiment's artifacts go to ``work_dir/mlartifacts``,
    never to the current directory.

    Args:
        configured_uri: ``mlflow.tracking_uri`` from the config (may be empty).
        work_dir: the run's work directory.
        experiment: experiment name, or ``None`` to only set the URI.

    Returns:
        The tracking URI in use.
    """
    quiet_mlflow()
    import mlflow

    global _uri_we_set
    uri = tracking_uri(configured_uri, work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    # Only a value this call changed is ours: the user's own variable, set again unchanged, stays the user's
    # (else a second model in one process, an ensemble's, would be looked up in the work dir's store).
    if os.environ.get("MLFLOW_TRACKING_URI") != before:
        _uri_we_set = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_registry_uri(uri)
    if experiment:
        client = mlflow.MlflowClient()
        if client.get_experiment_by_name(experiment) is None:
            location = (work_dir / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
            client.create_experiment(experiment, artifact_location=location)
        mlflow.set_experiment(experiment)
    return uri


def log_model(checkpoint: Path, registered_name: str | None = None) -> str | None:
    """Log the checkpoint as a self-contained pyfunc model in the active run, optionally registering it.

    The model ships this project's code and pinned requirements (see
    :mod:`pipeline.registry.pyfunc`). Registering twice from one run (a call that
    resumes after the tracking server went away) returns the version already there.

    Args:
        checkpoint: the weights-only checkpoint with its plan and inference settings.
        registered_name: registry name; ``None`` logs without registering.

    Returns:
        The registered version (as a string), or ``None``.
    """
    import mlflow

    from pipeline.registry import pyfunc_entry
    from pipeline.registry.pyfunc import code_paths, requirements

    run = mlflow.active_run()
    if registered_name and run is not None:
        existing = version_of_run(registered_name, run.info.run_id)
        if existing is not None:
            return existing
    info = mlflow.pyfunc.log_model(
        name=MODEL_ARTIFACT,
        python_model=pyfunc_entry.__file__,
        artifacts={"checkpoint": str(checkpoint)},
        code_paths=code_paths(),
        pip_requirements=requirements(),
        registered_model_name=registered_name,
    )
    version = getattr(info, "registered_model_version", None)
    return str(version) if version is not None else None


def version_of_run(name: str, run_id: str) -> str | None:
    """The version of ``name`` registered from ``run_id``, if any.

    Args:
        name: registered model name.
        run_id: the MLflow run.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        found = mlflow.MlflowClient().search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException:
        return None
    return str(max(int(v.version) for v in found)) if found else None


def champion_version(name: str) -> str | None:
    """The version holding ``champion``, if any.

    Args:
        name: registered model name.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


@dataclass
class Promotion:
    """Outcome of the champion gate.

    Args:
        version: the new version.
        promoted: whether it took the ``champion`` alias.
        previous_version: the champion before, if any.
        decision: the gate's decision in words.
    """

    version: str
    promoted: bool
    previous_version: str | None
    decision: str


def set_aliases(name: str, version: str, promoted: bool, previous: str | None, decision: str) -> Promotion:
    """Give ``version`` the ``candidate`` alias, and ``champion`` when the gate promoted it.

    The outcome is also recorded as tags on the active run.

    Args:
        name: registered model name.
        version: the new version.
        promoted: the gate's decision.
        previous: the champion's version before.
        decision: the decision in words.
    """
    import mlflow

    client = mlflow.MlflowClient()
    client.set_registered_model_alias(name, CANDIDATE, version)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    mlflow.set_tags({"registry.model_name": name, "registry.version": version,
                     "registry.champion_before": str(previous), "registry.decision": decision})
    return Promotion(version, promoted, previous, decision)


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference resolved to a local checkpoint, with the identity a DICOM SEG states.

    Args:
        path: the local ``.pt`` checkpoint; a registered version's lies in the shared model cache
            (read it, never change or delete it), held there against eviction by any process until
            :func:`pipeline.registry.model_cache.release` is called with it once it is loaded (or this process ends).
        name: registered model name (``local`` for a file, ``run`` for a run's model).
        version: registry version, run id or checkpoint file name.
    """

    path: Path
    name: str
    version: str


def resolve_model(ref: str, work_dir: Path, download_dir: Path, tracking: str | None = None,
                  cache_max_gb: float | None = model_cache.DEFAULT_MAX_GB) -> ResolvedModel:
    """A local checkpoint path for any model reference.

    A registered version (``models:/``) is downloaded once into the per-user model cache
    (:mod:`pipeline.registry.model_cache`) and reused; an alias is looked up on every call.

    Args:
        ref: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/model`` or a ``.pt`` file.
        work_dir: work directory whose SQLite store is used when no tracking URI is set.
        download_dir: where a run's artifacts are downloaded, and a registered version's when the
            cache cannot be written (the caller removes it).
        tracking: the tracking URI to use (a run's own); ``None``: ``MLFLOW_TRACKING_URI``, else the work dir's store.
        cache_max_gb: ``registry.model_cache_max_gb``, the model cache's size cap (the environment's overrides it).
    """
    if not ref.startswith(("models:/", "runs:/")):
        path = Path(ref)
        if not path.is_file():
            raise InputDataError(path, "model checkpoint not found")
        return ResolvedModel(path, "local", path.name)
    setup(tracking, work_dir)
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        if ref.startswith("models:/"):
            return _registered_model(ref, download_dir, cache_max_gb)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(download_dir)))
        return ResolvedModel(_checkpoint_in(local, ref), "run", ref[len("runs:/"):].split("/")[0])
    except (MlflowException, OSError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise PipelineError(f"{ref}: model not found in {redact_uri(mlflow.get_tracking_uri())} ({message})") from None


def _registered_model(ref: str, download_dir: Path, cache_max_gb: float | None) -> ResolvedModel:
    """A ``models:/`` reference's checkpoint, from the model cache (or ``download_dir`` when it cannot be written)."""
    import mlflow

    mv = _model_version(ref)
    name, version = mv.name, str(mv.version)

    def download(dst: Path) -> Path:
        # The version just looked up, not the alias again: it may have moved since.
        uri = f"models:/{name}/{version}"
        return _checkpoint_in(Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst))), ref)

    models_dir = model_cache.usable_models_dir()
    if models_dir is None:
        return ResolvedModel(download(download_dir), name, version)
    key = model_cache.cache_key(mlflow.get_registry_uri(), name, version, mv.run_id, mv.creation_timestamp)
    checkpoint = model_cache.cached_checkpoint(models_dir, key, f"{name} version {version}", download, (name, version),
                                               cache_max_gb)
    return ResolvedModel(checkpoint, name, version)


def _checkpoint_in(local: Path, ref: str) -> Path:
    """The checkpoint among a model's downloaded artifacts."""
    candidates = sorted(local.rglob("checkpoint.pt")) or sorted(local.rglob("*.pt"))
    if not candidates:
        raise PipelineError(f"{ref}: the model's artifacts hold no checkpoint")
    return candidates[0]


def _model_version(ref: str) -> ModelVersion:
    """The registry's record (``ModelVersion``) behind ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``: one request."""
    import mlflow

    body = ref[len("models:/"):]
    client = mlflow.MlflowClient()
    if "@" in body:
        name, alias = body.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, _, version = body.rpartition("/")
    return client.get_model_version(name, version)
