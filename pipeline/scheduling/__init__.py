"""Scheduling: what a cron job, systemd timer or Kubernetes CronJob needs around a ``run``.

The work-directory locks (one call per fold, one preprocessing at a time), the run
state (skip what is up to date, resume what was interrupted) and the session that
ties them to one MLflow run (tagged with the cross-validation id, :func:`cv_id`). It calls into the
stages' building blocks below it (data, training, registry) and is imported only by
``pipeline.stages`` and the CLI.
"""

from pipeline.scheduling.folds import completed_folds, cv_config_hash, locked_folds
from pipeline.scheduling.lock import fold_lock_path, preprocess_lock, work_dir_lock
from pipeline.scheduling.session import RunSession, cv_id
from pipeline.scheduling.state import code_version

__all__ = [
    "RunSession",
    "code_version",
    "completed_folds",
    "cv_config_hash",
    "cv_id",
    "locked_folds",
    "fold_lock_path",
    "preprocess_lock",
    "work_dir_lock",
]
