"""Run tracking: the one package that talks to MLflow.

A package of five modules, one job each: `store` (the tracking URI, the client, MLflow's limits
and tags, failures as one line), `tracker` (the `Tracker` interface the driver records a run
through, and its MLflow, null and in-memory implementations), `outbox` (the training workers'
metric rows, sent exactly once without holding up training), `runs` (existing runs read back and
annotated by id) and `environment` (reproducibility tags). The names below are the package's
public surface, so that `from lejepa_platform.tracking import X` does not depend on which module X
lives in.
"""

from lejepa_platform.tracking.environment import run_environment_tags
from lejepa_platform.tracking.outbox import MetricsOutbox
from lejepa_platform.tracking.runs import (download_artifact, find_run, log_artifacts_to_run, log_metrics_to_run,
                                           metric_history, search_runs)
from lejepa_platform.tracking.store import (METRICS_PER_BATCH, PARAM_VALUE_LIMIT, PARAMS_PER_BATCH, PARENT_TAG, STATUSES,
                                            SWEEP_TAG, TAG_VALUE_LIMIT, prepare_params, resolve_tracking_uri,
                                            wait_for_server)
from lejepa_platform.tracking.tracker import InMemoryTracker, MLflowTracker, NullTracker, Tracker

__all__ = ["METRICS_PER_BATCH", "PARAMS_PER_BATCH", "PARAM_VALUE_LIMIT", "PARENT_TAG", "STATUSES", "SWEEP_TAG",
           "TAG_VALUE_LIMIT", "InMemoryTracker", "MLflowTracker", "MetricsOutbox", "NullTracker", "Tracker",
           "download_artifact", "find_run", "log_artifacts_to_run", "log_metrics_to_run", "metric_history",
           "prepare_params", "resolve_tracking_uri", "run_environment_tags", "search_runs", "wait_for_server"]
