"""Run tracking: the one package that talks to MLflow.

A package of four modules, one job each: `store` (the tracking URI, the client, MLflow's limits
and tags), `tracker` (the `Tracker` interface the training loop writes through, and its MLflow,
null and in-memory implementations), `runs` (existing runs read back and annotated by id) and
`environment` (reproducibility tags). The names below are the package's public surface, so that
`from lejepa_platform.tracking import X` does not depend on which module X lives in.
"""

from lejepa_platform.tracking.environment import run_environment_tags
from lejepa_platform.tracking.runs import (download_artifact, find_run, log_artifacts_to_run, log_metrics_to_run,
                                           metric_history, search_runs)
from lejepa_platform.tracking.store import (METRICS_PER_BATCH, PARAM_VALUE_LIMIT, PARAMS_PER_BATCH, PARENT_TAG, STATUSES,
                                            SWEEP_TAG, TAG_VALUE_LIMIT, resolve_tracking_uri)
from lejepa_platform.tracking.tracker import InMemoryTracker, MLflowTracker, NullTracker, Tracker, prepare_params

__all__ = ["METRICS_PER_BATCH", "PARAMS_PER_BATCH", "PARAM_VALUE_LIMIT", "PARENT_TAG", "STATUSES", "SWEEP_TAG",
           "TAG_VALUE_LIMIT", "InMemoryTracker", "MLflowTracker", "NullTracker", "Tracker", "download_artifact",
           "find_run", "log_artifacts_to_run", "log_metrics_to_run", "metric_history", "prepare_params",
           "resolve_tracking_uri", "run_environment_tags", "search_runs"]
