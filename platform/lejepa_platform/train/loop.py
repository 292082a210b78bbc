"""The Ray Train worker loop: one function run by every rank.

Rank is read once here and decides only two things: where the rank's metric rows go (MLflow on
rank 0, nowhere elsewhere) and who writes the checkpoint files. Every rank calls
`ray.train.report` at the same steps, as Ray Train requires.

The loop body is the step and its bookkeeping (train/bookkeeping.py): `Pace` plans each step
(learning-rate position, last step under steps or time budget, stop requests) from numbers the
ranks agree on at logging steps; `IdLog` audits the data order. Metric rows go through a
`MetricsOutbox` (tracking/outbox.py): held until the checkpoint that covers them has been reported,
then sent by a thread of its own, so a tracking server that restarts or is gone never holds up
training; every checkpoint keeps the rows the store has not confirmed, and each step is stored
exactly once across restarts. Between logging steps nothing reads the device: a non-finite loss is
recorded by `FiniteCheck` and raised at the next logging step, before any checkpoint, naming the
first bad step.

Exact data resume: each rank streams its own part of the run's order (`pipeline.rank_batches`) and
tracks its position from the rows it consumed; every checkpoint carries all ranks' positions, so a
restart continues at the next unconsumed row of each rank. A stop request from the driver
(SIGTERM, Ctrl-C: run/stop.py) makes every rank checkpoint after the next step planned and return.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed

from lejepa_platform.console import warn
from lejepa_platform.config import RunConfig, augment_placement, per_worker_batch_size, warmup_steps
from lejepa_platform.overrides import from_dict
from lejepa_platform.data.pipeline import rank_batches
from lejepa_platform.data.stream import StreamPosition
from lejepa_platform.eval.geometry import CollapseAlarm
from lejepa_platform.tracking import MetricsOutbox
from lejepa_platform.train.bookkeeping import LOSS_KEY, IdLog, Pace, StopRequests
from lejepa_platform.train.checkpoint import TrainState, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from lejepa_platform.train.step import FiniteCheck, Pretrainer, make_optimizer, train_step

RECORD_IDS_ENV = "LEJEPA_RECORD_IDS"
"""Set on the driver to a directory: every rank writes the record ids of each step there (`IdLog`)."""
COLLAPSE_SIGREG_PER_IMAGE = 0.1
"""Collapse alarm threshold on SIGReg, per image of the global batch: the statistic grows like
N x distance; a Gaussian sits near 1 whatever N, a rank-1 embedding near 0.17 N, all-zeros 0.40 N."""


def worker_loop(loop_config: dict[str, Any]) -> None:
    """Entry point given to TorchTrainer; `loop_config` is built by `launch.pretrain`."""
    cfg = from_dict(RunConfig, loop_config["run"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.train.torch_threads or math.ceil(cfg.train.cpus_per_worker))
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)
    model = ray.train.torch.prepare_model(Pretrainer(cfg, loop_config["num_classes"], device=device))  # DDP if world > 1
    bare = model.module if hasattr(model, "module") else model
    optimizer = make_optimizer(bare, cfg)
    state = _restore(bare, optimizer, device)
    rows = (MetricsOutbox(loop_config["tracking_uri"], loop_config["mlflow_run_id"], LOSS_KEY)
            if rank == 0 and loop_config.get("mlflow_run_id") else MetricsOutbox.nowhere())
    rows.add(state.pending_metrics)  # a restart first sends what its checkpoint holds and the store lacks
    rows.release()
    if state.finished or state.step >= cfg.train.steps:
        rows.close()
        return
    pace = Pace(cfg, trained_before_s=state.train_seconds, stop=StopRequests(loop_config.get("board"), rank),
                world=world, device=device)
    ids_log = IdLog.open(loop_config.get("ids_log"), rank, loop_config["windows_per_epoch"])
    alarm = CollapseAlarm(bare.encoder.embed_dim, sigreg_max=COLLAPSE_SIGREG_PER_IMAGE * cfg.data.batch_size)
    finite = FiniteCheck(device)
    step, position = state.step, _own_position(state.positions, rank, world)
    per_worker = per_worker_batch_size(cfg)
    batches = rank_batches(loop_config["plan"], cfg.data, seed=cfg.train.seed, epochs=loop_config["epochs"],
                           batch_rows=per_worker, rank=rank, world=world, position=position,
                           photometric=augment_placement(cfg) == "data", pin_memory=device.type == "cuda",
                           stats=loop_config.get("data_stats"))
    window_start, window_steps = time.perf_counter(), 0
    with contextlib.closing(batches):
        for batch in batches:
            plan = pace.plan(step)
            metrics = train_step(model, optimizer, batch, cfg=cfg, step=step, device=device,
                                 diagnostics=plan.logging, position=plan.position, finite=finite)
            step, window_steps = step + 1, window_steps + 1
            position = position.after(batch["item"][-1], batch["row"][-1])
            ids_log.write(step, batch)
            if not plan.logging:
                continue
            finite.raise_if_nonfinite()  # before anything is reported or checkpointed
            row = _mean_over_ranks(metrics, world)
            row.update({"lr": optimizer.param_groups[0]["lr"], "train/seconds": pace.seconds(), "step": step,
                        "throughput/images_per_s": window_steps * per_worker * world
                        / max(time.perf_counter() - window_start, 1e-9)})
            rows.add([row])
            if step > warmup_steps(cfg):
                _check_collapse(alarm, row, rows)
            if step % cfg.train.checkpoint_every == 0 or plan.ends:
                snapshot = TrainState(model=bare.state_dict(), optimizer=optimizer.state_dict(), step=step,
                                      rng=capture_rng(), pending_metrics=rows.undelivered(),
                                      train_seconds=pace.seconds(), finished=plan.last,
                                      positions=_all_positions(position, rank, world, device))
                _report_with_checkpoint(row, snapshot, cfg, rank)
                rows.release()
            else:
                ray.train.report(row)
            if plan.ends:
                rows.close()
                return
            window_start, window_steps = time.perf_counter(), 0  # reporting time counts in the next window
    raise RuntimeError(f"the training data stream ended at step {step} of {cfg.train.steps}")


def _restore(model: Pretrainer, optimizer: torch.optim.Optimizer, device: torch.device) -> TrainState:
    """Load the latest checkpoint Ray Train hands this attempt into `model` and `optimizer` and return
    its state; a fresh state (step 0) when there is none."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainState(model={}, optimizer={}, step=0, rng={})
    with checkpoint.as_directory() as directory:
        state, _ = load_checkpoint(directory, map_location=device)
    model.load_state_dict(state.model)
    optimizer.load_state_dict(state.optimizer)
    restore_rng(state.rng)
    return state


def _own_position(positions: list[tuple[int, int]], rank: int, world: int) -> StreamPosition:
    """This rank's position from a checkpoint's list (empty: a fresh run starts at the beginning)."""
    if not positions:
        return StreamPosition()
    if len(positions) != world:
        raise RuntimeError(f"the checkpoint holds data positions of {len(positions)} ranks, this run has {world}: "
                           f"resume with train.workers = {len(positions)}")
    return StreamPosition(*positions[rank])


def _all_positions(position: StreamPosition, rank: int, world: int, device: torch.device) -> list[tuple[int, int]]:
    """Every rank's position, gathered on each rank (rank 0 writes them into the checkpoint)."""
    if world == 1:
        return [(position.item, position.row)]
    table = torch.zeros((world, 2), dtype=torch.int64, device=device)
    table[rank] = torch.tensor([position.item, position.row], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(table)
    return [(int(i), int(r)) for i, r in table.tolist()]


def _check_collapse(alarm: CollapseAlarm, row: dict[str, float], rows: MetricsOutbox) -> None:
    """Warn once (worker log + an MLflow tag) when SIGReg or the effective rank says collapse."""
    message = alarm.update(int(row["step"]), row["loss/sigreg"], row["embed/effective_rank"])
    if message:
        warn(message)
        rows.set_tags({"lejepa.collapse_alarm": message})


def _report_with_checkpoint(row: dict[str, float], state: TrainState, cfg: RunConfig, rank: int) -> None:
    """Every rank reports; rank 0 attaches the checkpoint (Ray persists it before returning)."""
    if rank != 0:
        ray.train.report(row)
        return
    with tempfile.TemporaryDirectory(prefix="lejepa-ckpt-") as tmp:
        save_checkpoint(tmp, state, cfg)
        ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _mean_over_ranks(metrics: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    """Logged values are global-batch values: per-rank terms (prediction, probe) averaged over ranks."""
    keys = sorted(metrics)
    values = torch.stack([metrics[k].detach().float() for k in keys])
    if world > 1:
        torch.distributed.all_reduce(values)
        values /= world
    return dict(zip(keys, values.tolist()))
