"""The Ray Train worker loop: one function run by every rank, reading like the method.

Set up (model, optimizer, the restored checkpoint, the rank's stream from its data position), then
for each batch: plan the step (`Pace`), take it (`train_step`), account for it (`Progress`), and on
logging steps report (`Reports`: metric rows through an outbox that never holds up training, each
step stored once; collapse alarm; checkpoints). Between
logging steps nothing reads the device: a non-finite loss is recorded by `FiniteCheck` and raised
at the next logging step, before any checkpoint, naming the first bad step.

Exact data resume: each rank streams its own part of the run's order (`pipeline.rank_batches`) and
tracks its position from the rows it consumed; every checkpoint carries all ranks' positions, so a
restart continues at the next unconsumed row of each rank. A stop request from the driver
(SIGTERM, Ctrl-C: run/stop.py) makes every rank checkpoint after the next planned step and return.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import ray.train
import ray.train.torch
import torch

from lejepa_platform.config import RunConfig, augment_placement, per_worker_batch_size
from lejepa_platform.data.pipeline import DataStats, rank_batches
from lejepa_platform.data.reader import Plan
from lejepa_platform.data.stream import StreamPosition
from lejepa_platform.train.bookkeeping import IdLog, Pace, Progress, StopRequests
from lejepa_platform.train.checkpoint import TrainState, load_checkpoint, restore_rng
from lejepa_platform.train.reports import Reports, snapshot
from lejepa_platform.train.step import FiniteCheck, Pretrainer, make_optimizer, train_step

RECORD_IDS_ENV = "LEJEPA_RECORD_IDS"
"""Set on the driver to a directory: every rank writes the record ids of each step there (`IdLog`)."""
PLAN_KEY = "plan"
"""The one key of the train_loop_config TorchTrainer hands every worker: a `WorkerPlan`."""


@dataclasses.dataclass(frozen=True)
class WorkerPlan:
    """Everything a rank needs, built once by the driver (run/plan.py) and the same for every rank."""

    cfg: RunConfig
    data: Plan
    """The training split of data.source, planned once (units, rows, class names)."""
    num_classes: int
    """Classes of the online probe (0: no probe)."""
    epochs: int
    """Epochs of the run's order the ranks' streams cover."""
    windows_per_epoch: int
    tracking_uri: str
    mlflow_run_id: str | None
    board: Any = None
    """The progress board actor (metrics to the driver, stop requests from it)."""
    data_stats: DataStats | None = None
    ids_log: str | None = None
    """A directory for the record ids of every step (`RECORD_IDS_ENV`), or None."""


def worker_loop(config: dict[str, Any]) -> None:
    """Entry point given to TorchTrainer: config[PLAN_KEY] is the run's `WorkerPlan`."""
    plan: WorkerPlan = config[PLAN_KEY]
    cfg = plan.cfg
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    model, optimizer, device = _set_up_model(plan)
    state = _restore(model, optimizer, device)
    bare = model.module if hasattr(model, "module") else model
    with contextlib.closing(Reports(cfg, rank=rank, world=world, device=device, embed_dim=bare.encoder.embed_dim,
                                    tracking=(plan.tracking_uri, plan.mlflow_run_id),
                                    replay=state.pending_metrics)) as reports:
        if state.finished or state.step >= cfg.train.steps:
            return
        pace = Pace(cfg, trained_before_s=state.train_seconds, stop=StopRequests(plan.board, rank), world=world,
                    device=device)
        progress = Progress(state.step, _own_position(state.positions, rank, world),
                            IdLog.open(plan.ids_log, rank, plan.windows_per_epoch))
        finite = FiniteCheck(device)
        with contextlib.closing(_stream(plan, progress.position, rank, world, device)) as batches:
            for batch in batches:
                step = pace.plan(progress.step)
                metrics = train_step(model, optimizer, batch, cfg=cfg, step=progress.step, device=device,
                                     diagnostics=step.logging, position=step.position, finite=finite)
                progress.advance(batch)
                if step.logging:
                    finite.raise_if_nonfinite()  # before anything is reported or checkpointed
                    with pace.not_stepping():
                        reports.report(metrics, step, progress, lr=optimizer.param_groups[0]["lr"],
                                       train_seconds=pace.seconds(),
                                       checkpoint=lambda: snapshot(bare, optimizer, step=progress.step,
                                                                   train_seconds=pace.seconds(), finished=step.last))
                if step.ends:
                    return
    raise RuntimeError(f"the training data stream ended at step {progress.step} of {cfg.train.steps}")


def _set_up_model(plan: WorkerPlan) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.device]:
    """The Pretrainer on this rank's device (DDP-wrapped when world > 1), its optimizer, the device."""
    cfg = plan.cfg
    torch.set_num_threads(cfg.train.torch_threads or math.ceil(cfg.train.cpus_per_worker))
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)
    model = ray.train.torch.prepare_model(Pretrainer(cfg, plan.num_classes, device=device))
    bare = model.module if hasattr(model, "module") else model
    return model, make_optimizer(bare, cfg), device


def _restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> TrainState:
    """Load the latest checkpoint Ray Train hands this attempt into `model` and `optimizer` and return
    its state; a fresh state (step 0) when there is none."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainState(model={}, optimizer={}, step=0, rng={})
    with checkpoint.as_directory() as directory:
        state, _ = load_checkpoint(directory, map_location=device)
    (model.module if hasattr(model, "module") else model).load_state_dict(state.model)
    optimizer.load_state_dict(state.optimizer)
    restore_rng(state.rng)
    return state


def _stream(plan: WorkerPlan, position: StreamPosition, rank: int, world: int,
            device: torch.device) -> Iterator[dict[str, Any]]:
    """The rank's batches from `position` on (pinned for a GPU)."""
    cfg = plan.cfg
    return rank_batches(plan.data, cfg.data, seed=cfg.train.seed, epochs=plan.epochs,
                        batch_rows=per_worker_batch_size(cfg), rank=rank, world=world, position=position,
                        photometric=augment_placement(cfg) == "data", pin_memory=device.type == "cuda",
                        stats=plan.data_stats)


def _own_position(positions: list[tuple[int, int]], rank: int, world: int) -> StreamPosition:
    """This rank's position from a checkpoint's list (empty: a fresh run starts at the beginning)."""
    if not positions:
        return StreamPosition()
    if len(positions) != world:
        raise RuntimeError(f"the checkpoint holds data positions of {len(positions)} ranks, this run has {world}: "
                           f"resume with train.workers = {len(positions)}")
    return StreamPosition(*positions[rank])
