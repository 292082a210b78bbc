"""Ray Tune sweeps: one driver function per trial, each launching its own TorchTrainer.

Ray Train V2 no longer runs inside `Tuner(trainer)`; the pattern is a function trainable that
calls `pretrain` with a `TuneReportCallback` forwarding the workers' reports to Tune. Trial
drivers hold a custom `trial_driver` resource (a CPU reservation would starve the workers), and
each trial is an MLflow child run under one parent run for the sweep.

Restart: Tune keeps its experiment state under <storage>/<sweep name>; `--resume` restores it,
so finished trials are not run again and unfinished ones continue from their last checkpoint.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import ray
from ray import tune

from lejepa_platform.capacity import check_room_for_data, trainers_that_fit
from lejepa_platform.config import RunConfig, SweepConfig, flatten, to_dict
from lejepa_platform.overrides import apply_overrides, from_dict, set_values
from lejepa_platform.console import say
from lejepa_platform.errors import RunFailed, UserError
from lejepa_platform.ray_env import init_ray
from lejepa_platform.recipes import load_recipe
from lejepa_platform.sweep.analysis import analyze_from_cli
from lejepa_platform.tracking import SWEEP_TAG, MLflowTracker, find_run, resolve_tracking_uri, run_environment_tags, search_runs
from lejepa_platform.data.pipeline import pin_ray_data_actors
from lejepa_platform.run.launch import pretrain
from lejepa_platform.run.plan import prepare
from lejepa_platform.run.storage import (absolute_storage, is_remote, read_run_record, recorded_tracking_uri,
                                         run_exists, write_run_record)

SWEEP_RECORD = "lejepa_sweep"
TRIAL_RESOURCE = "trial_driver"


def param_space(space: dict[str, dict[str, list]]) -> dict[str, Any]:
    """Our {key: {kind: values}} spec as Tune search primitives (keys stay dotted config keys)."""
    makers = {"grid": tune.grid_search, "choice": tune.choice,
              "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
              "randint": lambda v: tune.randint(*v)}
    return {key: makers[kind](list(values)) for key, spec in space.items() for kind, values in spec.items()}


def check_space(scfg: SweepConfig) -> None:
    """Every discrete value and both ends of every range must make a valid run config."""
    for key, spec in scfg.space.items():
        kind, values = next(iter(spec.items()))
        candidates = values if kind in ("grid", "choice") else [values[0], values[1] - (1 if kind == "randint" else 0)]
        for value in candidates:
            preflight_model_only(set_values(scfg.base, {key: value}))


def preflight_model_only(cfg: RunConfig) -> None:
    """Cheap per-value check: the backbone must exist (data is checked once for the base)."""
    from lejepa_platform.model import check_backbone

    check_backbone(cfg.model)


def trial_cpus(cfg: RunConfig) -> float:
    return cfg.train.workers * cfg.train.cpus_per_worker


def concurrency(scfg: SweepConfig, cpus: float, gpus: float) -> int:
    """Trials that fit side by side, leaving CPUs for the data tasks (`capacity`); refuses impossible trials."""
    cfg = scfg.base
    need = trial_cpus(cfg)
    check_room_for_data(need, cpus, "one trial's train.workers x train.cpus_per_worker")
    if cfg.train.use_gpu and cfg.train.workers > gpus:
        raise UserError(f"one trial needs {cfg.train.workers} GPUs (train.use_gpu), the cluster has {gpus:g}")
    fit = trainers_that_fit(need, cpus)
    if cfg.train.use_gpu:
        fit = min(fit, int(gpus // cfg.train.workers))
    return min(scfg.max_concurrent_trials or fit, fit)


def _run_trial(params: dict[str, Any], *, base: dict, sweep_name: str, parent_run_id: str, tracking_uri: str) -> None:
    """One trial: the base config with this trial's values, trained by its own TorchTrainer."""
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    cfg = set_values(from_dict(RunConfig, base), params)
    cfg = set_values(cfg, {"train.name": f"{sweep_name}-{trial_id}", "track.run_name": trial_id,
                           "track.uri": tracking_uri})
    resume = cfg.train.name if run_exists(cfg.train.storage_path, cfg.train.name) else None
    if resume:
        # Tune saves its experiment state on a timer, so a trial that finished just before the
        # driver died can be handed out again: its MLflow run says whether it is really done.
        record = read_run_record(cfg.train.storage_path, cfg.train.name)
        done = find_run(recorded_tracking_uri(record["tracking_uri"], tracking_uri), record["mlflow_run_id"])
        if done["status"] == "FINISHED":
            tune.report(done["metrics"])
            return
    pretrain(cfg, resume=resume, quiet=True, parent_run_id=parent_run_id, callbacks=(TuneReportCallback(),))


def sweep(scfg: SweepConfig, *, resume: bool = False, address: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """Run (or resume) a sweep; returns the trials and the analysis summary."""
    prepare(scfg.base)  # the base's backbone and data, checked once before any trial
    check_space(scfg)
    storage = absolute_storage(scfg.base.train.storage_path)
    _check_name(scfg.name, storage, resume)
    total = _connect(address)
    pin_ray_data_actors()  # before any trial: a trial's driver may run on a worker node
    max_concurrent = concurrency(scfg, total.get("CPU", 0.0), total.get("GPU", 0.0))
    tracking_uri = resolve_tracking_uri(scfg.base.track.uri)
    experiment = scfg.base.track.experiment
    parent = _open_parent_run(scfg, tracking_uri, experiment, resume, storage)
    say(quiet, f"sweep {scfg.name}: parent MLflow run {parent.run_id} at {tracking_uri}; "
                f"up to {max_concurrent} trials at a time")
    trainable = tune.with_resources(
        functools.partial(_run_trial, base=to_dict(scfg.base), sweep_name=scfg.name,
                          parent_run_id=parent.run_id, tracking_uri=tracking_uri),
        {TRIAL_RESOURCE: 1})
    grid = _tuner(scfg, trainable, storage=storage, max_concurrent=max_concurrent, resume=resume, quiet=quiet).fit()

    children = search_runs(tracking_uri, experiment, parent_run_id=parent.run_id)
    close_stopped_trials(tracking_uri, experiment, children,
                         {(r.metrics or {}).get("trial_id") for r in grid if not r.error})
    trials = [{"trial_id": (r.metrics or {}).get("trial_id"), "status": "ERROR" if r.error else "TERMINATED",
               "config": r.config, "last": {k: v for k, v in (r.metrics or {}).items() if k in (scfg.metric, "step")}}
              for r in grid]
    try:
        # beside the sweep when storage is a local directory; the analysis is also attached to the parent run
        out = None if is_remote(storage) else f"{storage}/{scfg.name}/analysis"
        analysis = analyze_from_cli(experiment, tracking_uri=tracking_uri, out=out, quiet=quiet)
    except UserError as err:
        analysis = {"skipped": str(err)}
    parent.finish("FINISHED")
    if trials and all(t["status"] == "ERROR" for t in trials):
        raise RunFailed(f"sweep {scfg.name}: all {len(trials)} trials failed; see {storage}/{scfg.name}")
    return {"sweep": scfg.name, "parent_run_id": parent.run_id, "tracking_uri": tracking_uri, "trials": trials,
            "analysis": analysis}


def _check_name(name: str, storage: str, resume: bool) -> None:
    exists = run_exists(storage, name)
    if exists and not resume:
        raise UserError(f"a sweep named {name!r} already exists under {storage}; pass --resume or set sweep.name")
    if resume and not exists:
        raise UserError(f"no sweep named {name!r} under {storage} to resume")


def _connect(address: str | None) -> dict[str, float]:
    """Join `address` / RAY_ADDRESS or start a local cluster with a trial-driver slot per CPU; the
    cluster's resources, which must include TRIAL_RESOURCE."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        cpus = os.cpu_count() or 1
        init_ray(address, num_cpus=cpus, resources={TRIAL_RESOURCE: cpus}, include_dashboard=True,
                 dashboard_host="127.0.0.1")
    total = ray.cluster_resources()
    if total.get(TRIAL_RESOURCE, 0) < 1:
        raise UserError(f"the Ray cluster has no {TRIAL_RESOURCE!r} resource for trial drivers; start it with "
                        f"--resources='{{\"{TRIAL_RESOURCE}\": 8}}' on the head node (cluster.yaml does)")
    return total


def _tuner(scfg: SweepConfig, trainable: Any, *, storage: str, max_concurrent: int, resume: bool,
           quiet: bool) -> tune.Tuner:
    """The sweep's Tuner: restored from its storage when resuming, else a new one."""
    if resume:
        return tune.Tuner.restore(f"{storage}/{scfg.name}", trainable, resume_unfinished=True, resume_errored=True)
    # max_t above the number of reports a trial can make: ASHA stops a trial that reaches
    # max_t, which would cut a healthy trial off before its evaluation and artifacts.
    scheduler = (tune.schedulers.ASHAScheduler(time_attr="training_iteration", grace_period=scfg.grace_reports,
                                               reduction_factor=scfg.reduction_factor,
                                               max_t=scfg.base.train.steps + 1)
                 if scfg.scheduler == "asha" else tune.schedulers.FIFOScheduler())
    return tune.Tuner(
        trainable, param_space=param_space(scfg.space),
        tune_config=tune.TuneConfig(num_samples=scfg.num_samples, scheduler=scheduler, metric=scfg.metric,
                                    mode=scfg.mode, max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(name=scfg.name, storage_path=storage, verbose=0 if quiet else 1))


def sweep_from_cli(recipe: str, *, overrides: list[str], resume: bool, address: str | None, quiet: bool) -> dict:
    """`lejepa sweep RECIPE`: `--set base.loss.lam=...` or `--set sweep.num_samples=...` adjust the recipe."""
    scfg = load_recipe(recipe, SweepConfig)
    base_overrides = [o.removeprefix("base.") for o in overrides if o.startswith("base.")]
    sweep_overrides = [o.removeprefix("sweep.") for o in overrides if o.startswith("sweep.")]
    other = [o for o in overrides if not o.startswith(("base.", "sweep."))]
    if other:
        raise UserError(f"sweep overrides must start with base. or sweep. (got {other[0]!r})")
    scfg = apply_overrides(scfg, [f"base.{o}" for o in base_overrides] + sweep_overrides)
    return sweep(scfg, resume=resume, address=address, quiet=quiet)


def _open_parent_run(scfg: SweepConfig, uri: str, experiment: str, resume: bool, storage: str) -> MLflowTracker:
    """The sweep's parent MLflow run; its id is kept beside Tune's state so --resume reuses it."""
    if resume:
        record = read_run_record(storage, f"{scfg.name}/{SWEEP_RECORD}")
        return MLflowTracker.start(uri, experiment, run_id=record["mlflow_run_id"])
    parent = MLflowTracker.start(uri, experiment, run_name=scfg.name,
                                 tags={**run_environment_tags(), SWEEP_TAG: "parent"})
    parent.log_params({f"sweep.{k}": v for k, v in flatten(scfg).items() if not k.startswith("base.")})
    parent.log_dict(to_dict(scfg), "sweep.json")
    write_run_record(storage, f"{scfg.name}/{SWEEP_RECORD}", {"mlflow_run_id": parent.run_id, "tracking_uri": uri})
    return parent


def close_stopped_trials(uri: str, experiment: str, children: list[dict], ended_cleanly: set[str]) -> None:
    """Trials stopped by the scheduler are killed mid-run: their MLflow runs say RUNNING, or FAILED
    when the trial's process raised on its way down (its Ray Train controller dies with it, and the
    trainer's wait for it fails). Tune knows which trials ended without an error of their own
    (`ended_cleanly`, by trial id = child run name): those that did not finish are KILLED."""
    for child in children:
        if child["status"] == "RUNNING" or (child["status"] == "FAILED" and child["name"] in ended_cleanly):
            MLflowTracker.start(uri, experiment, run_id=child["run_id"]).finish("KILLED")

