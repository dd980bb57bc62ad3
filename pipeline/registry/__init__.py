"""Registry (MLflow): tracking and its outage outbox, registration, the champion gate, provenance, the pyfunc, privacy.

Everything that leaves the work directory for MLflow goes through here, redacted:
run parameters and tags, metrics (kept on disk while the server is away), the
self-contained model, its version description and the champion alias. It may import
data, inference, evaluation and training, never scheduling, pacs or the stages.
"""

from pipeline.registry.ensemble import EnsembleData, EnsembleSummary, FoldModel, register_ensemble
from pipeline.registry.gate import gated_registration, judge, score_and_log
from pipeline.registry.gate import tags as gate_tags
from pipeline.registry.lease import GateLease, GateLeaseError, lease_model_name
from pipeline.registry.model_cache import clear_cache, list_cache
from pipeline.registry.predictors import load_predictor
from pipeline.registry.privacy import dataset_label, redact_config, run_params
from pipeline.registry.provenance import Provenance, describe_version
from pipeline.registry.registration import (
    SELECTION_METRIC,
    Promotion,
    ResolvedModel,
    champion_version,
    log_model,
    resolve_model,
    set_aliases,
    setup,
    tracking_uri,
)
from pipeline.registry.tracking import RunLogger, metric_name, when_reachable
from pipeline.registry.tracking import connect as connect_tracking

__all__ = [
    "EnsembleData",
    "EnsembleSummary",
    "FoldModel",
    "load_predictor",
    "register_ensemble",
    "Provenance",
    "RunLogger",
    "connect_tracking",
    "describe_version",
    "gate_tags",
    "GateLease",
    "GateLeaseError",
    "gated_registration",
    "judge",
    "lease_model_name",
    "list_cache",
    "when_reachable",
    "SELECTION_METRIC",
    "Promotion",
    "ResolvedModel",
    "champion_version",
    "clear_cache",
    "dataset_label",
    "log_model",
    "metric_name",
    "redact_config",
    "resolve_model",
    "run_params",
    "score_and_log",
    "set_aliases",
    "setup",
    "tracking_uri",
]
