"""Scheduling: what a cron job, systemd timer or Kubernetes CronJob needs around a ``run``.

The work-directory lock, the run state (skip what is up to date, resume what was
interrupted) and the session that ties them to one MLflow run. It calls into the
stages' building blocks below it (data, training, registry) and is imported only by
``pipeline.stages`` and the CLI.
"""

from pipeline.scheduling.lock import work_dir_lock
from pipeline.scheduling.session import RunSession

__all__ = ["RunSession", "work_dir_lock"]
