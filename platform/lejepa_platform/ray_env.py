"""How every command of the platform joins or starts Ray: one place, one runtime environment.

Ray Train V2 hands each `ray.train.report` from a worker to its controller through a queue that
holds one report, and the controller empties it on its health-check poll, every 2 s by default. A
worker that reports more often blocks inside `report()` until the next poll: 20 steps reporting
every step took 2 s a step instead of 0.35 s (`lejepa pretrain --set train.steps=20 --set
train.log_every=1 --set eval.enabled=false`, before and after). Polling four times a second costs
the controller next to nothing. It is passed as the job's runtime_env, so it reaches the
controller on a joined cluster too.

OpenMP threads of torch (libgomp) spin up to 300,000 times before sleeping when they wait for
work. On a CPU node the trainer's threads share the cores with Ray Data's view tasks, and the
spinning threads keep the cores the view tasks need: with one core busy elsewhere, a default
step (2 threads) took 0.78 s instead of 0.26 s; spinning 1,000 times it took 0.53 s. End to
end, `lejepa pretrain --set eval.enabled=false` ran 228 s with it and 244 s with libgomp's
default (GOMP_SPINCOUNT=300000 exported, which wins over this one as any user's value does).
Where nothing else runs it may cost a few percent; on a 2-core VM that is within run-to-run noise.

Ray starts every worker process at niceness 15 (its `worker_niceness`) so that the driver and its
own daemons win the CPU. On a machine with a core or two, the trainer is then preempted by every
wake-up of the raylet, GCS, dashboard agent and driver. The job runs its workers at niceness 0
(`RAY_worker_niceness`, read by each worker at start): `lejepa bench step`, Ray side / plain
loop, median 0.85 over 6 runs at 15 and 0.93 over 8 runs at 0. Trainer and Ray Data tasks keep
equal priority between themselves either way.
"""

from __future__ import annotations

import os
from typing import Any

import ray

JOB_ENV_VARS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "GOMP_SPINCOUNT": "1000", "RAY_worker_niceness": "0"}


def job_env_vars() -> dict[str, str]:
    """The environment variables every process of the job gets: JOB_ENV_VARS, the user's values winning."""
    return {key: os.environ.get(key, value) for key, value in JOB_ENV_VARS.items()}


def init_ray(address: str | None = None, **local: Any) -> None:
    """Join the cluster at `address`, or start a local one with `local` (ray.init keyword arguments);
    either way with the platform's runtime environment and without worker logs on the driver."""
    job = {"log_to_driver": False, "runtime_env": {"env_vars": job_env_vars()}}
    if address:
        ray.init(address=address, **job)
    else:
        ray.init(**local, **job)
