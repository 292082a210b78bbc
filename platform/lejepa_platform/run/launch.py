"""From a RunConfig to a finished, recorded pretraining run on Ray Train, in four named steps:

    prepare      check and plan everything that needs no worker (run/plan.py): bad input fails in a
                 second with one line
    tracked_run  open (or resume) the MLflow run and the run record; the run's outcome, whatever
                 it is, becomes its status in one place: FINISHED, KILLED (stopped by a signal) or
                 FAILED
    fit          the TorchTrainer, with the stop signals (SIGTERM, Ctrl-C) of run/stop.py
    finalize     the backbone artifact, then the evaluation and the data figures, on the driver
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from lejepa_platform.artifacts import CONFIG_FILE
from lejepa_platform.capacity import check_room_for_data
from lejepa_platform.config import RunConfig, flatten, per_worker_batch_size, to_dict, warmup_steps
from lejepa_platform.console import say, warn
from lejepa_platform.data.pipeline import DataStats, pin_ray_data_actors
from lejepa_platform.defaults import default_run_config
from lejepa_platform.errors import RunFailed, RunStopped, TrackingError, UserError
from lejepa_platform.overrides import apply_overrides, from_dict
from lejepa_platform.ray_env import init_ray, on_this_node
from lejepa_platform.recipes import load_recipe
from lejepa_platform.run.finalize import finalize_run, log_data_figures
from lejepa_platform.run.plan import RunPlan, prepare
from lejepa_platform.run.progress import ProgressBoard, ProgressCallback, ProgressPrinter
from lejepa_platform.run.stop import SIGNAL_EXIT_CODES, fit_with_stop_signals
from lejepa_platform.run.storage import absolute_storage, check_unmasked, read_run_record, write_run_record
from lejepa_platform.tracking import MLflowTracker, run_environment_tags
from lejepa_platform.train.checkpoint import load_checkpoint
from lejepa_platform.train.loop import PLAN_KEY, RECORD_IDS_ENV, worker_loop


def resolve_config(recipe: str | None, overrides: list[str]) -> RunConfig:
    """The recipe's config (or the embedded default) with `--set` overrides applied."""
    base = load_recipe(recipe, RunConfig) if recipe else default_run_config()
    return apply_overrides(base, overrides)


def connect_ray(address: str | None) -> bool:
    """Join `address` / RAY_ADDRESS, or start a local cluster without Ray's dashboard (a run is
    followed in MLflow, and on a small machine the dashboard's processes cost training steps:
    docs/performance.md; start `ray start --head` and pass its address to have one).

    Returns True when the cluster is a local one whose resources cannot grow, so impossible
    resource requests can be refused up front; a joined cluster may autoscale.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return address is None and ray.get_runtime_context().worker.mode == ray.SCRIPT_MODE
    init_ray(address, include_dashboard=False)
    return not address


def worker_resources(cfg: RunConfig) -> dict[str, float]:
    """What one Ray Train worker holds."""
    return {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1.0} if cfg.train.use_gpu else {})}


def check_resources(cfg: RunConfig, final: bool) -> None:
    """On a cluster that cannot grow, refuse workers it can never place (and leave CPU for Data)."""
    if not final:
        return
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    need_cpu = cfg.train.workers * cfg.train.cpus_per_worker
    if cfg.train.use_gpu and gpus < cfg.train.workers:
        raise UserError(f"train.workers = {cfg.train.workers} with train.use_gpu needs {cfg.train.workers} GPUs; "
                        f"this cluster has {gpus:g}")
    check_room_for_data(need_cpu, cpus, "train.workers x train.cpus_per_worker")


def pretrain(cfg: RunConfig, *, resume: str | None = None, address: str | None = None, quiet: bool = False,
             parent_run_id: str | None = None, callbacks: tuple = ()) -> dict[str, Any]:
    """Run (or resume) one pretraining and return its summary; raises RunFailed if training fails,
    RunStopped when a signal stopped it (after a checkpoint)."""
    plan = prepare(cfg, resume=resume)
    check_resources(cfg, connect_ray(address))
    started = time.monotonic()
    with tracked_run(plan, parent_run_id=parent_run_id, quiet=quiet) as (plan, tracker):
        trained = trained_checkpoint(plan)
        checkpoint, data_stats = (trained, DataStats()) if trained else fit(plan, quiet=quiet, callbacks=callbacks)
        summary = finalize(plan, tracker, checkpoint, data_stats, quiet=quiet)
    summary.update({"name": plan.name, "storage": plan.run_dir, "mlflow_run_id": plan.mlflow_run_id,
                    "tracking_uri": plan.tracking_uri, "wall_time_s": round(time.monotonic() - started, 1)})
    return summary


@contextlib.contextmanager
def tracked_run(plan: RunPlan, *, parent_run_id: str | None, quiet: bool) -> Iterator[tuple[RunPlan, MLflowTracker]]:
    """The run's MLflow run, opened (a new run: params, config artifact and run record written) or
    resumed, and finished with the status the outcome says: FINISHED when the block completes,
    KILLED when a signal stopped it (RunStopped, a second Ctrl-C), FAILED on any other error."""
    if plan.resumed:
        tracker = MLflowTracker.start(plan.tracking_uri, plan.cfg.track.experiment, run_id=plan.mlflow_run_id)
    else:
        tracker = _open_new_run(plan, parent_run_id)
        plan = plan.tracked(tracker.run_id)
    say(quiet, f"run {plan.name}: MLflow run {tracker.run_id} at {plan.tracking_uri}")
    say(quiet, f"  view it: mlflow ui --backend-store-uri {plan.tracking_uri}")
    try:
        yield plan, tracker
    except BaseException as err:
        with contextlib.suppress(TrackingError):  # the error that ended the run is the one to report
            tracker.finish(_status_of(err))
        raise
    tracker.finish("FINISHED")


def _status_of(err: BaseException) -> str:
    """KILLED for a stop (RunStopped, a second Ctrl-C or SIGTERM, an exit), FAILED for any other error."""
    return "FAILED" if isinstance(err, Exception) and not isinstance(err, RunStopped) else "KILLED"


def _open_new_run(plan: RunPlan, parent_run_id: str | None) -> MLflowTracker:
    cfg = plan.cfg
    tracker = MLflowTracker.start(plan.tracking_uri, cfg.track.experiment, run_name=cfg.track.run_name or plan.name,
                                  parent_run_id=parent_run_id, tags=run_environment_tags())
    with tracker.failed_on_error():
        tracker.log_params(flatten(cfg))
        tracker.log_params({"derived.per_worker_batch_size": per_worker_batch_size(cfg),
                            "derived.warmup_steps": warmup_steps(cfg), "derived.data_rows": plan.data.rows})
        tracker.log_dict(to_dict(cfg), CONFIG_FILE)
        write_run_record(plan.storage, plan.name, {"config": to_dict(cfg), "mlflow_run_id": tracker.run_id,
                                                   "tracking_uri": plan.tracking_uri})
    return tracker


def trained_checkpoint(plan: RunPlan) -> ray.train.Checkpoint | None:
    """When resuming a run whose training is over (its latest registered checkpoint is finished or
    at train.steps, as the workers would find it), that checkpoint: what is left (the metrics MLflow
    lacks, artifacts, evaluation) happens on the driver without starting workers."""
    if not plan.resumed:
        return None
    try:
        checkpoint = ray.train.Result.from_path(plan.run_dir).checkpoint
    except RuntimeError:  # no checkpoint registered yet
        return None
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        state = load_checkpoint(directory)[0]
    return checkpoint if state.finished or state.step >= plan.cfg.train.steps else None


def fit(plan: RunPlan, *, quiet: bool, callbacks: tuple = ()) -> tuple[ray.train.Checkpoint, DataStats]:
    """Train on Ray Train until the run's last step or a stop signal; returns the last checkpoint and
    the stream's figures. RunFailed when workers failed past train.max_failures or left no
    checkpoint; RunStopped (with the signal's exit code) after a requested stop."""
    cfg = plan.cfg
    pin_ray_data_actors()
    board, data_stats = ProgressBoard.options(**on_this_node()).remote(), DataStats()
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={PLAN_KEY: plan.for_workers(board=board, data_stats=data_stats,
                                                      ids_log=os.environ.get(RECORD_IDS_ENV))},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu,
                                               resources_per_worker=worker_resources(cfg)),
        run_config=ray.train.RunConfig(
            name=plan.name, storage_path=plan.storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=[ProgressCallback(board), *callbacks]))
    try:
        with ProgressPrinter(board, cfg.train.steps, time_budget_s=cfg.train.time_budget_s, enabled=not quiet):
            result, stop_signal = fit_with_stop_signals(trainer, board, quiet=quiet)
    except ray.train.TrainingFailedError as err:
        raise RunFailed(f"{plan.name}: {_root_cause(err)} (last good checkpoint kept under {plan.run_dir})") from err
    except BaseException:  # a second Ctrl-C / SIGTERM: stopped at once, from the last checkpoint
        warn(f"stopped; continue with: {plan.resume_command}")
        raise
    if result.checkpoint is None:
        raise RunFailed(f"{plan.name}: training ended without a checkpoint")
    if stop_signal is not None:
        with result.checkpoint.as_directory() as directory:
            stopped_at = load_checkpoint(directory)[0].step
        raise RunStopped(f"{plan.name}: stopped by {signal.Signals(stop_signal).name} after step {stopped_at} "
                         f"(checkpoint written); continue with: {plan.resume_command}",
                         exit_code=SIGNAL_EXIT_CODES[stop_signal])
    return result.checkpoint, data_stats


def finalize(plan: RunPlan, tracker: MLflowTracker, checkpoint: ray.train.Checkpoint, data_stats: DataStats, *,
             quiet: bool) -> dict[str, Any]:
    """The end of the run on the driver (run/finalize.py); any failure is one RunFailed line naming
    the trained checkpoint and the command that finishes the job (`lejepa eval`, or `--resume` when
    the tracking store was away: the checkpoint keeps the rows it lacks)."""
    try:  # nothing after training may leave the run looking alive
        with checkpoint.as_directory() as directory:
            summary = finalize_run(plan.cfg, plan.evaluation, tracker, Path(directory), quiet=quiet)
        summary["data"] = log_data_figures(tracker, data_stats, summary["steps"])
        return summary
    except TrackingError as err:  # the store is away or cannot store: nothing is lost, record it later
        raise RunFailed(f"{plan.name}: training finished ({plan.run_dir}/{Path(checkpoint.path).name}) but {err}; "
                        f"the checkpoint keeps the metrics MLflow lacks: once the store works again, record the "
                        f"run with: {plan.resume_command}") from None
    except Exception as err:
        stored = f"{plan.run_dir}/{Path(checkpoint.path).name}"
        detail = " ".join(str(err).split())[:300] or type(err).__name__
        data = plan.cfg.eval.data or plan.cfg.data.source
        raise RunFailed(f"{plan.name}: training finished but the end of the run failed: {detail}; the trained "
                        f"checkpoint is {stored}; evaluate it later with: lejepa eval {stored} --data {data}") from err


def pretrain_from_cli(recipe: str | None, *, overrides: list[str], resume: str | None, address: str | None,
                      quiet: bool) -> dict[str, Any]:
    """`lejepa pretrain`: resolve the config (from the run record when resuming), then run."""
    if resume:
        if recipe:
            raise UserError("--resume takes the config recorded with the run; do not pass a recipe as well")
        storage_override = [o for o in overrides if o.startswith("train.storage_path=")]
        storage = absolute_storage(resolve_config(None, storage_override).train.storage_path)
        recorded = from_dict(RunConfig, read_run_record(storage, resume)["config"])
        cfg = apply_overrides(recorded, overrides)
        check_unmasked(flatten(cfg))
        if cfg.train.workers != recorded.train.workers:
            raise UserError(f"train.workers = {cfg.train.workers} is not allowed with --resume {resume}: each rank's "
                            f"data position is in the checkpoint, so resume with train.workers = "
                            f"{recorded.train.workers}")
    else:
        cfg = resolve_config(recipe, overrides)
    return pretrain(cfg, resume=resume, address=address, quiet=quiet)


def _root_cause(err: BaseException) -> str:
    """The innermost worker error as one line."""
    text = str(err).strip().splitlines()
    for line in reversed(text):
        if "NonFiniteLossError" in line or "Error:" in line:
            return line.strip()
    return text[-1].strip() if text else type(err).__name__

