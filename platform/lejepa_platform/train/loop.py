"""The Ray Train worker loop: one function run by every rank.

Rank is read once here and decides only two things: where the rank's metric rows go (MLflow on
rank 0, nowhere elsewhere) and who writes the checkpoint files. Every rank calls
`ray.train.report` at the same steps, as Ray Train requires.

Exactly-once metrics across restarts: rows are held in a `MetricsOutbox` and sent to MLflow only
after the checkpoint that covers them has been reported, by the outbox's own thread, so a tracking
server that restarts or disappears never holds up training; every checkpoint carries the rows the
store has not confirmed yet. After a restart, rank 0 sends the checkpoint's rows again, recomputes
the steps after the checkpoint, and never writes a step MLflow already holds (tracking/outbox.py).

The run's length: exactly train.steps optimizer steps, or, under train.time_budget_s, fewer when
the budget runs out first (`step.schedule_position` decides; the training time so far travels in
each checkpoint, so restarts and `--resume` spend the same budget).

Exact data resume: each rank streams its own part of the run's order (`pipeline.rank_batches`) and
tracks its position from the rows it consumed; every checkpoint carries all ranks' positions, so a
restart continues at the next unconsumed row of each rank. A stop request from the driver
(SIGTERM, Ctrl-C: run/stop.py) makes every rank checkpoint after the current step and return.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
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
from lejepa_platform.train.checkpoint import TrainState, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from lejepa_platform.train.step import Pretrainer, make_optimizer, schedule_position, train_step

LOSS_KEY = "loss/total"
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
    threads = cfg.train.torch_threads or math.ceil(cfg.train.cpus_per_worker)
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device()

    torch.manual_seed(cfg.train.seed)
    # on device, DDP if world > 1
    model = ray.train.torch.prepare_model(Pretrainer(cfg, loop_config["num_classes"], device=device))
    bare = model.module if hasattr(model, "module") else model
    optimizer = make_optimizer(bare, cfg)
    step, trained_before, finished = 0, 0.0, False
    outbox = (MetricsOutbox(loop_config["tracking_uri"], loop_config["mlflow_run_id"], LOSS_KEY)
              if rank == 0 and loop_config.get("mlflow_run_id") else MetricsOutbox.nowhere())
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state, _ = load_checkpoint(directory, map_location=device)
        bare.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        restore_rng(state.rng)
        step, trained_before, finished = state.step, state.train_seconds, state.finished
    if checkpoint is not None:  # its rows the store may lack; steps it already holds are never sent again
        outbox.add(state.pending_metrics)
        outbox.release()

    per_worker = per_worker_batch_size(cfg)
    alarm = CollapseAlarm(bare.encoder.embed_dim, sigreg_max=COLLAPSE_SIGREG_PER_IMAGE * cfg.data.batch_size)
    position = _own_position(state.positions if checkpoint is not None else [], rank, world)
    batches = rank_batches(loop_config["plan"], cfg.data, seed=cfg.train.seed, epochs=loop_config["epochs"],
                           batch_rows=per_worker, rank=rank, world=world, position=position,
                           photometric=augment_placement(cfg) == "data", pin_memory=device.type == "cuda",
                           stats=loop_config.get("data_stats"))
    ids_log = IdLog.open(loop_config.get("ids_log"), rank, loop_config["windows_per_epoch"])
    stop = StopRequests(loop_config.get("board"), rank=rank, world=world, device=device)
    clock = TrainingClock(trained_before, agree_across_ranks=cfg.train.time_budget_s > 0 and world > 1, device=device)
    window_start, window_steps = time.perf_counter(), 0
    finished = finished or step >= cfg.train.steps
    stream_ended = True
    for batch in ([] if finished else batches):
        trained_s, step_s = clock.tick()
        schedule, finished = schedule_position(step, cfg, trained_s, step_s)
        stopping = stop.requested()
        logging_step = finished or stopping or _is_logged(step + 1, cfg)
        metrics = train_step(model, optimizer, batch, cfg=cfg, step=step, device=device, diagnostics=logging_step,
                             position=schedule)
        step += 1
        window_steps += 1
        position = position.after(batch["item"][-1], batch["row"][-1])
        ids_log.write(step, batch)
        if not logging_step:
            continue
        elapsed = time.perf_counter() - window_start
        row = _mean_over_ranks(metrics, world)
        row["throughput/images_per_s"] = window_steps * per_worker * world / max(elapsed, 1e-9)
        row["train/seconds"] = clock.seconds()
        row["step"] = step
        outbox.add([row])
        if step > warmup_steps(cfg):
            _check_collapse(alarm, row, outbox)
        window_start, window_steps = time.perf_counter(), 0  # reporting time counts in the next window
        if step % cfg.train.checkpoint_every == 0 or finished or stopping:
            snapshot = TrainState(model=bare.state_dict(), optimizer=optimizer.state_dict(), step=step,
                                  rng=capture_rng(), pending_metrics=outbox.undelivered(),
                                  train_seconds=clock.seconds(), finished=finished,
                                  positions=_all_positions(position, rank, world, device))
            _report_with_checkpoint(row, snapshot, cfg, rank)
            outbox.release()
        else:
            ray.train.report(row)
        if finished or stopping:
            stream_ended = False
            break
    outbox.close()
    if stream_ended and not finished:
        raise RuntimeError(f"the training data stream ended at step {step} of {cfg.train.steps}")


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


class StopRequests:
    """Whether the driver asked the run to stop (SIGTERM, Ctrl-C): rank 0 polls the progress board
    without waiting for the answer; with several ranks a one-scalar all-reduce makes every rank stop
    after the same step."""

    def __init__(self, board: Any, *, rank: int, world: int, device: torch.device) -> None:
        self._board = board if rank == 0 else None
        self._world, self._device = world, device
        self._pending = self._board.stop_requested.remote() if self._board is not None else None
        self._seen = False

    def requested(self) -> bool:
        if self._pending is not None and not self._seen:
            ready, _ = ray.wait([self._pending], timeout=0)
            if ready:
                self._seen = bool(ray.get(ready[0]))
                self._pending = None if self._seen else self._board.stop_requested.remote()
        if self._world == 1:
            return self._seen
        flag = torch.tensor([float(self._seen)], device=self._device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


class IdLog:
    """The record ids of every step, one JSON line per step in DIR/rank-R.jsonl, when the driver
    was started with LEJEPA_RECORD_IDS=DIR: an audit of the data order (the exact-resume tests read it)."""

    def __init__(self, path: Path | None, windows_per_epoch: int) -> None:
        self._path, self._windows = path, windows_per_epoch

    @classmethod
    def open(cls, directory: str | None, rank: int, windows_per_epoch: int) -> IdLog:
        if not directory:
            return cls(None, windows_per_epoch)
        Path(directory).mkdir(parents=True, exist_ok=True)
        return cls(Path(directory) / f"rank-{rank}.jsonl", windows_per_epoch)

    def write(self, step: int, batch: dict[str, torch.Tensor]) -> None:
        if self._path is None:
            return
        line = {"step": step, "uid": batch["uid"].tolist(), "epoch": (batch["item"] // self._windows).tolist()}
        with self._path.open("a") as f:
            f.write(json.dumps(line) + "\n")


class TrainingClock:
    """What train.time_budget_s counts: this loop's wall time from its first batch plus what earlier
    attempts spent (from the checkpoint), and a running mean of the time per step. With several
    ranks under a budget, both are the maximum over ranks, so every rank takes the same last step."""

    def __init__(self, before_s: float, *, agree_across_ranks: bool, device: torch.device) -> None:
        self._before_s = before_s
        self._agree, self._device = agree_across_ranks, device
        self._origin: float | None = None  # set by the first tick: waiting for the data to start is start-up
        self._last_tick = 0.0
        self._step_s = 0.0

    def seconds(self) -> float:
        return self._before_s if self._origin is None else time.perf_counter() - self._origin

    def tick(self) -> tuple[float, float]:
        """Called as each step starts: (training seconds so far, mean seconds per step)."""
        first = self._origin is None
        if first and self._agree:  # every rank starts counting together, once the slowest has its first batch
            torch.distributed.barrier()
        now = time.perf_counter()
        if first:
            self._origin = now - self._before_s
        else:
            took = now - self._last_tick
            self._step_s = took if self._step_s == 0.0 else 0.9 * self._step_s + 0.1 * took
        self._last_tick = now
        values = [now - self._origin, self._step_s]
        if self._agree:
            agreed = torch.tensor(values, dtype=torch.float64, device=self._device)
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
            values = agreed.tolist()
        return values[0], values[1]


def _is_logged(step: int, cfg: RunConfig) -> bool:
    """Steps (counted from 1) that report metrics: every log_every, every checkpoint, the last."""
    return step % cfg.train.log_every == 0 or step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps


def _check_collapse(alarm: CollapseAlarm, row: dict[str, float], outbox: MetricsOutbox) -> None:
    """Warn once (worker log + an MLflow tag) when SIGReg or the effective rank says collapse."""
    message = alarm.update(int(row["step"]), row["loss/sigreg"], row["embed/effective_rank"])
    if message:
        warn(message)
        outbox.set_tags({"lejepa.collapse_alarm": message})


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
