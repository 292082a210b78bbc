"""What a logging step reports: one metrics row per step (global-batch values), the collapse alarm,
and on checkpoint steps the checkpoint, with every rank's data position and the rows MLflow has not
confirmed. Rank decides only where the rows go (MLflow on rank 0 when the run is tracked, nowhere
elsewhere) and who writes the checkpoint files; every rank calls `ray.train.report` at the same
steps, as Ray Train requires.

Metric rows go through a `MetricsOutbox` (tracking/outbox.py): held until the checkpoint that covers
them has been reported, then sent by a thread of its own, so a tracking server that restarts or is
gone never holds up training; every checkpoint keeps the rows the store has not confirmed, and each
step is stored exactly once across restarts.
"""

from __future__ import annotations

import tempfile
from typing import Any

import ray.train
import torch
import torch.distributed

from lejepa_platform.config import RunConfig, warmup_steps
from lejepa_platform.console import warn
from lejepa_platform.data.stream import StreamPosition
from lejepa_platform.eval.geometry import CollapseAlarm
from lejepa_platform.tracking import MetricsOutbox
from lejepa_platform.train.bookkeeping import LOSS_KEY, Progress, StepPlan
from lejepa_platform.train.checkpoint import TrainState, capture_rng, save_checkpoint

COLLAPSE_SIGREG_PER_IMAGE = 0.1
"""Collapse alarm threshold on SIGReg, per image of the global batch: the statistic grows like
N x distance; a Gaussian sits near 1 whatever N, a rank-1 embedding near 0.17 N, all-zeros 0.40 N."""


class Reports:
    """The rank's side of reporting (a run id None: nothing goes to MLflow); `close` when done."""

    def __init__(self, cfg: RunConfig, *, rank: int, world: int, device: torch.device, embed_dim: int,
                 tracking: tuple[str, str | None], replay: list[dict[str, float]]) -> None:
        uri, run_id = tracking
        self._cfg, self._rank, self._world, self._device = cfg, rank, world, device
        self.rows = (MetricsOutbox(uri, run_id, LOSS_KEY) if rank == 0 and run_id else MetricsOutbox.nowhere())
        self.rows.add(replay)  # a restart first sends what its checkpoint holds and the store lacks
        self.rows.release()
        self._alarm = CollapseAlarm(embed_dim, sigreg_max=COLLAPSE_SIGREG_PER_IMAGE * cfg.data.batch_size)

    def report(self, metrics: dict[str, torch.Tensor], plan: StepPlan, progress: Progress, *,
               lr: float, train_seconds: float, checkpoint: Any) -> None:
        """Report a logging step; `checkpoint()` builds the TrainState when this step checkpoints."""
        step = progress.step
        row = self._mean_over_ranks(metrics)
        row.update({"lr": lr, "train/seconds": train_seconds, "step": step,
                    "throughput/images_per_s": progress.images_per_s(self._cfg.data.batch_size)})
        self.rows.add([row])
        if step > warmup_steps(self._cfg):
            self._check_collapse(row)
        if step % self._cfg.train.checkpoint_every == 0 or plan.ends:
            state: TrainState = checkpoint()
            state.pending_metrics = self.rows.undelivered()
            state.positions = self._all_positions(progress.position)
            self._report_with_checkpoint(row, state)
            self.rows.release()
        else:
            ray.train.report(row)

    def close(self) -> None:
        """Let the rows on their way reach the store (briefly: the last checkpoint keeps them)."""
        self.rows.close()

    def _mean_over_ranks(self, metrics: dict[str, torch.Tensor]) -> dict[str, float]:
        """Logged values are global-batch values: per-rank terms (prediction, probe) averaged over ranks."""
        keys = sorted(metrics)
        values = torch.stack([metrics[k].detach().float() for k in keys])
        if self._world > 1:
            torch.distributed.all_reduce(values)
            values /= self._world
        return dict(zip(keys, values.tolist()))

    def _check_collapse(self, row: dict[str, float]) -> None:
        """Warn once (worker log + an MLflow tag) when SIGReg or the effective rank says collapse."""
        message = self._alarm.update(int(row["step"]), row["loss/sigreg"], row["embed/effective_rank"])
        if message:
            warn(message)
            self.rows.set_tags({"lejepa.collapse_alarm": message})

    def _all_positions(self, position: StreamPosition) -> list[tuple[int, int]]:
        """Every rank's position, gathered on each rank (rank 0 writes them into the checkpoint)."""
        if self._world == 1:
            return [(position.item, position.row)]
        table = torch.zeros((self._world, 2), dtype=torch.int64, device=self._device)
        table[self._rank] = torch.tensor([position.item, position.row], dtype=torch.int64, device=self._device)
        torch.distributed.all_reduce(table)
        return [(int(i), int(r)) for i, r in table.tolist()]

    def _report_with_checkpoint(self, row: dict[str, float], state: TrainState) -> None:
        """Every rank reports; rank 0 attaches the checkpoint (Ray persists it before returning)."""
        if self._rank != 0:
            ray.train.report(row)
            return
        with tempfile.TemporaryDirectory(prefix="lejepa-ckpt-") as tmp:
            save_checkpoint(tmp, state, self._cfg)
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, step: int, train_seconds: float,
             finished: bool) -> TrainState:
    """The rank's state for a checkpoint (rows and positions are added by `Reports`)."""
    return TrainState(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step, rng=capture_rng(),
                      train_seconds=train_seconds, finished=finished)
