"""How every command of the platform joins or starts Ray: one place, one runtime environment.

The job's environment variables (`JOB_ENV_VARS`, a user's own values winning) fix three things
that otherwise cost a small machine much of its speed (measurements in docs/performance.md):
- RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: Ray Train V2 hands each `ray.train.report` to its controller
  through a one-slot queue emptied on the controller's health-check poll (2 s by default), so a
  worker that reports more often blocks in `report()`. Polling four times a second costs the
  controller next to nothing. As the job's runtime_env it reaches the controller on a joined
  cluster too.
- GOMP_SPINCOUNT: torch's OpenMP threads spin a long time before sleeping when they wait for work;
  on a CPU node they share the cores with the data side's view tasks and the spinning keeps the cores
  those tasks need. A short spin gives them back.
- RAY_worker_niceness: Ray starts workers at niceness 15 so the driver and its daemons win the CPU;
  on a machine with a core or two the trainer is then preempted at every wake-up of the raylet, GCS,
  dashboard agent and driver. The job's workers run at 0; the view tasks then lower their own
  priority below the trainer's (`pipeline.VIEW_TASK_NICENESS`).

A local cluster also starts with `LOCAL_SYSTEM_CONFIG` (on a cluster of your own, the same settings
are `RAY_<name>` environment variables of `ray start`, as in cluster.yaml): Ray prestarts a worker
process for every queued task it cannot place yet and kills idle workers after one second once a
node holds more worker processes than CPUs, which the trainer's helper actors already make true.
A rank's view tasks queue behind each other and pause while the trainer catches up, so their
worker process was killed and restarted (a Python start and a torch import, and its loaded work
items lost) every few seconds, and prestarted processes were started to do nothing.
"""

from __future__ import annotations

import os
from typing import Any

import ray

JOB_ENV_VARS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "GOMP_SPINCOUNT": "1000", "RAY_worker_niceness": "0"}
LOCAL_SYSTEM_CONFIG = {"enable_worker_prestart": False, "idle_worker_killing_time_threshold_ms": 60_000}
"""Raylet settings of a local cluster: no speculative worker processes, idle workers kept a minute."""


def job_env_vars() -> dict[str, str]:
    """The environment variables every process of the job gets: JOB_ENV_VARS, the user's values winning."""
    return {key: os.environ.get(key, value) for key, value in JOB_ENV_VARS.items()}


def on_this_node() -> dict[str, Any]:
    """Actor options that keep an actor on the node of the process creating it. The driver's helper
    actors ask for no CPU, so Ray places them on any node, and a worker node that goes away (a
    reclaimed spot instance) would take the run down with them; on the driver's node they live as
    long as the driver does."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}


def init_ray(address: str | None = None, **local: Any) -> None:
    """Join the cluster at `address`, or start a local one with `local` (ray.init keyword arguments);
    either way with the platform's runtime environment and without worker logs on the driver."""
    job = {"log_to_driver": False, "runtime_env": {"env_vars": job_env_vars()}}
    if address:
        ray.init(address=address, **job)
    else:
        ray.init(**local, **job, _system_config=dict(LOCAL_SYSTEM_CONFIG))  # ray.init adds its own keys to it
