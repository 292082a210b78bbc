"""From a RunConfig to a finished, recorded pretraining run on Ray Train.

Order matters for users: everything that can be checked without workers (config, backbone name,
data, resources) is checked first, so bad input fails in a second with one line. Then the MLflow
run is opened on the driver, the TorchTrainer runs, and the driver evaluates the final backbone
and attaches the artifacts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from lejepa_platform.artifacts import CONFIG_FILE
from lejepa_platform.capacity import check_room_for_data
from lejepa_platform.config import RunConfig, TrainConfig, flatten, per_worker_batch_size, to_dict, warmup_steps
from lejepa_platform.overrides import apply_overrides, from_dict
from lejepa_platform.console import say, warn
from lejepa_platform.data.pipeline import DataStats
from lejepa_platform.data.reader import UNIT_ROWS, Plan, plan_source
from lejepa_platform.data.stream import window_units, windows_per_epoch
from lejepa_platform.data.shards import read_manifest
from lejepa_platform.defaults import default_run_config
from lejepa_platform.errors import RunFailed, RunStopped, TrackingError, UserError
from lejepa_platform.run.evaluate import check_eval_data
from lejepa_platform.model import check_backbone
from lejepa_platform.ray_env import init_ray, on_this_node
from lejepa_platform.recipes import load_recipe
from lejepa_platform.tracking import MLflowTracker, resolve_tracking_uri, run_environment_tags
from lejepa_platform.run.finalize import finalize_run
from lejepa_platform.train.checkpoint import load_checkpoint
from lejepa_platform.train.loop import RECORD_IDS_ENV, worker_loop
from lejepa_platform.run.progress import ProgressBoard, ProgressCallback, ProgressPrinter
from lejepa_platform.run.stop import SIGNAL_EXIT_CODES, fit_with_stop_signals
from lejepa_platform.run.storage import (absolute_storage, check_unmasked, read_run_record, recorded_tracking_uri,
                                         run_exists, write_run_record)


@dataclasses.dataclass(frozen=True)
class DataFacts:
    """What the driver learns about the data before starting workers (planned once, sent to every rank)."""

    plan: Plan
    num_classes: int

    @property
    def rows(self) -> int:
        return self.plan.rows


def resolve_config(recipe: str | None, overrides: list[str]) -> RunConfig:
    """The recipe's config (or the embedded default) with `--set` overrides applied."""
    base = load_recipe(recipe, RunConfig) if recipe else default_run_config()
    return apply_overrides(base, overrides)


def preflight(cfg: RunConfig) -> DataFacts:
    """Checks that need no workers: backbone known to timm, data present and large enough, eval.data usable."""
    check_backbone(cfg.model)
    check_eval_data(cfg)
    plan = plan_source(cfg.data.source, cfg.data.split)
    rows = plan.rows
    if rows < cfg.data.batch_size:
        raise UserError(f"data.source {cfg.data.source!r} split {cfg.data.split!r} has {rows} images, "
                        f"fewer than data.batch_size = {cfg.data.batch_size}")
    manifest = _manifest_or_empty(cfg.data.source)
    return DataFacts(plan=plan, num_classes=len(manifest.get("classes", [])))


def epochs_needed(cfg: RunConfig, plan: Plan) -> int:
    """Whole epochs the ranks' streams must cover: the run's images, plus a shuffle window per rank
    (ranks take whole windows, so one may run a window ahead of another), plus one epoch of margin."""
    images = cfg.train.steps * cfg.data.batch_size
    slack = cfg.train.workers * window_units(cfg.data) * UNIT_ROWS
    return math.ceil((images + slack) / plan.rows) + 1


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
    """Run (or resume) one pretraining and return its summary; raises RunFailed if training fails."""
    facts = preflight(cfg)
    storage = absolute_storage(cfg.train.storage_path)
    name = resume or cfg.train.name or time.strftime("lejepa-%Y%m%d-%H%M%S")
    if not resume and run_exists(storage, name):
        raise UserError(f"a run named {name!r} already exists under {storage}; use --resume {name} or another train.name")
    final_cluster = connect_ray(address)
    check_resources(cfg, final_cluster)

    tracking_uri = resolve_tracking_uri(cfg.track.uri)
    if resume:
        record = read_run_record(storage, name)
        tracking_uri = recorded_tracking_uri(record["tracking_uri"], cfg.track.uri)
        tracker = MLflowTracker.start(tracking_uri, cfg.track.experiment, run_id=record["mlflow_run_id"])
    else:
        tracker = MLflowTracker.start(tracking_uri, cfg.track.experiment, run_name=cfg.track.run_name or name,
                                      parent_run_id=parent_run_id, tags=run_environment_tags())
        with tracker.failed_on_error():
            tracker.log_params(flatten(cfg))
            tracker.log_params({"derived.per_worker_batch_size": per_worker_batch_size(cfg),
                                "derived.warmup_steps": warmup_steps(cfg), "derived.data_rows": facts.rows})
            tracker.log_dict(to_dict(cfg), CONFIG_FILE)
            write_run_record(storage, name, {"config": to_dict(cfg), "mlflow_run_id": tracker.run_id,
                                             "tracking_uri": tracking_uri})
    say(quiet, f"run {name}: MLflow run {tracker.run_id} at {tracking_uri}")
    say(quiet, f"  view it: mlflow ui --backend-store-uri {tracking_uri}")

    board = ProgressBoard.options(**on_this_node()).remote()
    data_stats = DataStats()
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"run": to_dict(cfg), "num_classes": facts.num_classes,
                           "tracking_uri": tracking_uri, "mlflow_run_id": tracker.run_id,
                           "plan": facts.plan, "epochs": epochs_needed(cfg, facts.plan),
                           "windows_per_epoch": windows_per_epoch(facts.plan, cfg.data),
                           "data_stats": data_stats, "board": board,
                           "ids_log": os.environ.get(RECORD_IDS_ENV)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu,
            resources_per_worker=worker_resources(cfg)),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=[ProgressCallback(board), *callbacks]),
    )
    started = time.monotonic()
    resume_hint = f"lejepa pretrain --resume {name}" + (
        f" --set train.storage_path={storage}" if cfg.train.storage_path != TrainConfig.storage_path else "")
    try:
        with ProgressPrinter(board, cfg.train.steps, time_budget_s=cfg.train.time_budget_s, enabled=not quiet):
            result, stop_signal = fit_with_stop_signals(trainer, board, quiet=quiet)
    except ray.train.TrainingFailedError as err:
        tracker.finish("FAILED")
        raise RunFailed(f"{name}: {_root_cause(err)} (last good checkpoint kept under {storage}/{name})") from err
    except BaseException:  # a second Ctrl-C / SIGTERM: stopped at once, from the last checkpoint
        tracker.finish("KILLED")
        warn(f"stopped; continue with: {resume_hint}")
        raise
    if stop_signal is not None and result.checkpoint is not None:
        tracker.finish("KILLED")
        with result.checkpoint.as_directory() as directory:
            stopped_at = load_checkpoint(directory)[0].step
        raise RunStopped(f"{name}: stopped by {signal.Signals(stop_signal).name} after step {stopped_at} "
                         f"(checkpoint written); continue with: {resume_hint}", exit_code=SIGNAL_EXIT_CODES[stop_signal])
    if result.checkpoint is None:
        tracker.finish("FAILED")
        raise RunFailed(f"{name}: training ended without a checkpoint")
    checkpoint = f"{storage}/{name}/{Path(result.checkpoint.path).name}"
    try:  # nothing after training may leave the run looking alive
        with result.checkpoint.as_directory() as directory:
            summary = finalize_run(cfg, tracker, Path(directory), quiet=quiet)
        data_summary = data_stats.log_summary()
        tracker.log_metrics({"data/records_read": data_summary["records"],
                             "data/records_skipped": data_summary["skipped"]}, step=summary["steps"])
        tracker.finish("FINISHED")
    except TrackingError as err:  # the server is away or cannot store: nothing is lost, record it later
        with contextlib.suppress(TrackingError):
            tracker.finish("FAILED")
        raise RunFailed(f"{name}: training finished ({checkpoint}) but {err}; the checkpoint keeps the metrics "
                        f"MLflow lacks: once the store works again, record the run with: {resume_hint}") from None
    except Exception as err:
        tracker.finish("FAILED")
        detail = " ".join(str(err).split())[:300] or type(err).__name__
        raise RunFailed(f"{name}: training finished but the end of the run failed: {detail}; the trained checkpoint "
                        f"is {checkpoint}; evaluate it later with: lejepa eval {checkpoint} --data "
                        f"{cfg.eval.data or cfg.data.source}") from err
    except BaseException:
        tracker.finish("KILLED")
        raise
    summary.update({"data": {"records_read": data_summary["records"], "skipped": data_summary["reasons"]},
                    "name": name, "storage": f"{storage}/{name}", "mlflow_run_id": tracker.run_id,
                    "tracking_uri": tracking_uri, "wall_time_s": round(time.monotonic() - started, 1)})
    return summary


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


def _manifest_or_empty(source: str) -> dict[str, Any]:
    """The shard manifest (local, builtin or URI); {} for sources without one (image folders, tars)."""
    try:
        return read_manifest(source)
    except UserError:
        return {}


def _root_cause(err: BaseException) -> str:
    """The innermost worker error as one line."""
    text = str(err).strip().splitlines()
    for line in reversed(text):
        if "NonFiniteLossError" in line or "Error:" in line:
            return line.strip()
    return text[-1].strip() if text else type(err).__name__

