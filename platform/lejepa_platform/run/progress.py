"""A live progress line on the driver while `TorchTrainer.fit()` runs, and the way back: a stop request.

Ray Train V2 calls user callbacks on its controller actor, not on the driver, so the callback
posts the latest rank-0 metrics to a tiny actor and a driver thread polls it and redraws one
line on stderr: step/total, loss, images/s, ETA (the sooner of the steps' and the time budget's end).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import ray
from ray.train import UserCallback


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Holds the latest metrics row reported by rank 0, and whether the driver asked the run to stop."""

    def __init__(self) -> None:
        self._latest: dict[str, Any] | None = None
        self._stop = False

    def post(self, row: dict[str, Any]) -> None:
        self._latest = row

    def latest(self) -> dict[str, Any] | None:
        return self._latest

    def request_stop(self) -> None:
        self._stop = True

    def stop_requested(self) -> bool:
        return self._stop


class ProgressCallback(UserCallback):
    """Forwards each report's rank-0 metrics to the board."""

    def __init__(self, board: "ray.actor.ActorHandle") -> None:
        self.board = board

    def after_report(self, run_context, metrics, checkpoint) -> None:  # noqa: D401 (Ray's signature)
        if metrics:
            self.board.post.remote(dict(metrics[0]))


def format_line(row: dict[str, Any], total_steps: int, eta_s: float | None) -> str:
    """One progress line, e.g. `step 40/200  loss 0.8123  1234 img/s  ETA 1m05s`."""
    parts = [f"step {int(row['step'])}/{total_steps}", f"loss {row.get('loss/total', float('nan')):.4f}"]
    if "throughput/images_per_s" in row:
        parts.append(f"{row['throughput/images_per_s']:.0f} img/s")
    if "probe/online_acc" in row:
        parts.append(f"online probe {row['probe/online_acc']:.3f}")
    if eta_s is not None:
        minutes, seconds = divmod(int(eta_s), 60)
        parts.append(f"ETA {minutes}m{seconds:02d}s")
    return "  ".join(parts)


class ProgressPrinter:
    """Background thread redrawing the progress line until stopped."""

    def __init__(self, board: "ray.actor.ActorHandle", total_steps: int, *, time_budget_s: float = 0.0,
                 interval_s: float = 1.0, enabled: bool = True) -> None:
        self.board, self.total, self.budget = board, total_steps, time_budget_s
        self.interval_s, self.enabled = interval_s, enabled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._first: tuple[float, int] | None = None  # (time, step) of the first report seen: ETA excludes start-up
        self._printed = False
        self._last: dict[str, Any] | None = None

    def __enter__(self) -> "ProgressPrinter":
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join()
            if self._printed:
                sys.stderr.write("\n")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            row = ray.get(self.board.latest.remote())
            if not row or row == self._last:
                continue
            self._last = row
            step = int(row["step"])
            if self._first is None:
                self._first = (time.monotonic(), step)
            t_first, step_first = self._first
            done = step - step_first
            eta = (time.monotonic() - t_first) / done * (self.total - step) if done > 0 else None
            if self.budget > 0 and "train/seconds" in row:  # the budget may end the run first
                left = max(self.budget - row["train/seconds"], 0.0)
                eta = left if eta is None else min(eta, left)
            sys.stderr.write("\r" + format_line(row, self.total, eta).ljust(100))
            sys.stderr.flush()
            self._printed = True
