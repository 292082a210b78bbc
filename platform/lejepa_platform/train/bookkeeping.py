"""What the worker loop keeps besides the step: the run's pace (schedule, time budget, stop
requests, agreed across ranks at logging steps), the rank's progress (steps, data position,
throughput window) and the audit log of record ids (metric rows go through tracking's
MetricsOutbox: train/reports.py).

No step waits on the device or on other ranks for bookkeeping: ranks agree once per logging step
(one small all-reduce, where the step's metrics are read anyway) on the training time, the time per
step and whether the driver asked to stop, and until the next logging step every rank derives the
same learning-rate position, last step and stop step from those agreed numbers alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed

from lejepa_platform.config import RunConfig
from lejepa_platform.data.stream import StreamPosition
from lejepa_platform.train.step import schedule_position

LOSS_KEY = "loss/total"
"""The metric every logged row carries: the run's last step in MLflow is read from it."""


def is_logged(step: int, cfg: RunConfig) -> bool:
    """Steps (counted from 1) that report metrics: every log_every, every checkpoint, the last."""
    return step % cfg.train.log_every == 0 or step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What one optimizer step is: its position on the learning-rate schedule, whether it is the
    run's last (steps or time budget), whether it is the last before a requested stop, and whether
    it reports (every last step does)."""

    position: float
    last: bool
    stopping: bool
    logging: bool

    @property
    def ends(self) -> bool:
        return self.last or self.stopping


class StopRequests:
    """Whether the driver asked the run to stop (SIGTERM, Ctrl-C): rank 0 polls the progress board
    without waiting for the answer; other ranks learn it from `Pace`'s agreement. Without a board
    (a bare loop) no stop is ever seen."""

    def __init__(self, board: Any, rank: int) -> None:
        self._board = board if rank == 0 else None
        self._pending = self._board.stop_requested.remote() if self._board is not None else None
        self._seen = False

    def seen(self) -> bool:
        if self._pending is not None and not self._seen:
            ready, _ = ray.wait([self._pending], timeout=0)
            if ready:
                self._seen = bool(ray.get(ready[0]))
                self._pending = None if self._seen else self._board.stop_requested.remote()
        return self._seen


class Pace:
    """The run's training time (this loop's wall time from its first step plus what earlier
    attempts spent) and the plan of each step.

    At the first two steps and after every logging step the ranks agree (maximum over ranks) on the
    training time, the mean time per step since the last agreement and the stop request. Until
    the next agreement, step s is planned as if it started at the agreed time plus (s - s0) agreed
    step times: under train.time_budget_s the schedule advances by whichever is further along, and
    the step expected to end at or past the budget is the last, on every rank alike. Time spent in
    `not_stepping()` (reports, checkpoints) counts as training time but not as time per step: one
    checkpoint would otherwise make the next step look long enough to end the budget early.
    """

    def __init__(self, cfg: RunConfig, *, trained_before_s: float, stop: StopRequests, world: int,
                 device: torch.device) -> None:
        self._cfg, self._stop, self._world, self._device = cfg, stop, world, device
        self._before_s = trained_before_s
        self._origin: float | None = None  # set by the first agreement: waiting for the first batch is start-up
        self._agreed_step = 0
        self._agreed_at = 0.0
        self._trained_s = trained_before_s
        self._step_s = 0.0
        self._stopping = False
        self._agreements = 0
        self._agree_next = True
        self._not_stepping_s = 0.0  # since the last agreement

    def seconds(self) -> float:
        """Training time so far (this rank's clock)."""
        return self._before_s if self._origin is None else time.perf_counter() - self._origin

    @contextlib.contextmanager
    def not_stepping(self) -> Iterator[None]:
        """Work between steps (a report, a checkpoint): left out of the time per step."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._not_stepping_s += time.perf_counter() - started

    def plan(self, step: int) -> StepPlan:
        """The plan of optimizer step `step` (0-based), the same on every rank."""
        if self._agree_next:
            self._agree(step)
        position, last = self._position(step)
        if last and step != self._agreed_step and self._cfg.train.time_budget_s > 0:
            self._agree(step)  # a predicted end of the budget is confirmed on fresh numbers
            position, last = self._position(step)
        stopping = self._stopping and not last
        logging = last or stopping or is_logged(step + 1, self._cfg)
        self._agree_next = logging or self._agreements < 2  # no step timed yet: agree again after this one
        return StepPlan(position, last, stopping, logging)

    def _position(self, step: int) -> tuple[float, bool]:
        trained_s = self._trained_s + (step - self._agreed_step) * self._step_s
        return schedule_position(step, self._cfg, trained_s, self._step_s)

    def _agree(self, step: int) -> None:
        now = time.perf_counter()
        if self._origin is None:
            values = [self._before_s, 0.0]
        else:
            stepping_s = now - self._agreed_at - self._not_stepping_s
            values = [now - self._origin, stepping_s / max(step - self._agreed_step, 1)]
        values.append(float(self._stop.seen()))
        if self._world > 1:  # the slowest rank's numbers, and a stop if rank 0 saw one
            agreed = torch.tensor(values, dtype=torch.float64, device=self._device)
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
            values = agreed.tolist()
        if self._origin is None:  # every rank starts counting together, once the slowest has its first batch
            self._origin = time.perf_counter() - values[0]
        self._trained_s, self._step_s, self._stopping = values[0], values[1], values[2] > 0
        self._agreed_step, self._agreed_at, self._not_stepping_s = step, time.perf_counter(), 0.0
        self._agreements += 1


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

    def write(self, step: int, batch: dict[str, Any]) -> None:
        if self._path is None:
            return
        line = {"step": step, "uid": batch["uid"].tolist(), "epoch": (batch["item"] // self._windows).tolist()}
        with self._path.open("a") as f:
            f.write(json.dumps(line) + "\n")


class Progress:
    """Where the rank stands: optimizer steps done, its data position (the row after the last one it
    trained on), the id log, and the steps of the current throughput window."""

    def __init__(self, step: int, position: StreamPosition, ids: IdLog) -> None:
        self.step, self.position, self._ids = step, position, ids
        self._window_start, self._window_steps = time.perf_counter(), 0

    def advance(self, batch: dict[str, Any]) -> None:
        """Account for one trained batch (host-side columns only: no device read)."""
        self.step += 1
        self._window_steps += 1
        self.position = self.position.after(batch["item"][-1], batch["row"][-1])
        self._ids.write(self.step, batch)

    def images_per_s(self, images_per_step: int) -> float:
        """Images per second over the window, which starts again now: reporting and checkpointing
        count in the next window."""
        now = time.perf_counter()
        rate = self._window_steps * images_per_step / max(now - self._window_start, 1e-9)
        self._window_start, self._window_steps = now, 0
        return rate
