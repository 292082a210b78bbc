"""Metric rows on their way to an MLflow run, sent exactly once however often they are sent.

Rank 0 of a pretraining hands its rows to a `MetricsOutbox`: each row is held until the checkpoint
that covers it has been reported, then a thread of the outbox's own sends the rows in step order.
Training never waits for the tracking server: one that restarts, or is gone for good, costs the
run nothing but late rows. Rows not yet confirmed by the store stay in every checkpoint
(`undelivered`), so a restarted worker, `--resume` or the driver at the end of the run sends them
again (`send_rows`).

Sending a row twice is harmless, which is what makes "again" safe whoever sends it:
- every row is stamped once with the time it was made (the stamp travels in the checkpoint), and
  an MLflow SQL store keeps one copy of identical (key, value, step, time) points, so a row whose
  first send reached the store but whose answer was lost is not stored twice;
- steps the run already holds under other stamps (recomputed after a restart from an earlier
  checkpoint) are skipped: the run's last step is read before the first row is sent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

from lejepa_platform.batching import chunks
from lejepa_platform.console import warn
from lejepa_platform.errors import TrackingError
from lejepa_platform.tracking.store import (METRICS_PER_BATCH, PARAMS_PER_BATCH, TAG_VALUE_LIMIT, metric_points,
                                            open_client, prepare_params)

STEP = "step"
STAMP = "time_ms"
"""Key of a row's stamp: milliseconds since the epoch when the row was made."""
RETRY_WAITS_S = (1.0, 2.0, 4.0, 8.0)
"""Pauses between sending attempts while the store does not answer (the last one repeats)."""
CLOSE_WAIT_S = 5.0
"""How long closing waits for rows still on their way (the final checkpoint keeps them either way,
and the driver sends them again)."""


def stamped(row: dict[str, float]) -> dict[str, float]:
    """`row` with its stamp; a row from an older checkpoint without one is stamped now."""
    return row if STAMP in row else {**row, STAMP: time.time() * 1000}


def last_step(client: Any, run_id: str, key: str) -> int:
    """The run's last step of metric `key` in the store (0 when it has none)."""
    return max((m.step for m in client.get_metric_history(run_id, key)), default=0)


def send_rows(client: Any, run_id: str, rows: Iterable[dict[str, float]], after: int) -> int:
    """Send the stamped rows past step `after`, whole rows per request; returns the last step sent
    (`after` when none was). A request that fails raises TrackingError; rows sent before it stay sent."""
    batch: list[Any] = []
    for row in rows:
        if int(row[STEP]) <= after:
            continue
        points = _points(row)
        if batch and len(batch) + len(points) > METRICS_PER_BATCH:
            client.log_batch(run_id, metrics=batch)
            batch = []
        batch.extend(points)
        after = int(row[STEP])
    if batch:
        client.log_batch(run_id, metrics=batch)
    return after


def _points(row: dict[str, float]) -> list[Any]:
    values = {key: value for key, value in row.items() if key not in (STEP, STAMP)}
    return metric_points(values, int(row[STAMP]), int(row[STEP]))


class MetricsOutbox:
    """Rows held until released, then sent by a thread to run `run_id` at `uri`; `step_key` names a
    metric every row carries. `MetricsOutbox.nowhere()`, for ranks that do not track, keeps rows
    only until they are released."""

    def __init__(self, uri: str | None, run_id: str | None, step_key: str) -> None:
        self._uri, self._run_id, self._step_key = uri, run_id, step_key
        self._held: list[dict[str, float]] = []
        self._outgoing: list[dict[str, float]] = []
        self._tags: dict[str, str] = {}
        self._closing = False
        self._problem: str | None = None
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        if uri is not None:
            self._thread = threading.Thread(target=self._send_forever, name="lejepa-metrics-outbox", daemon=True)
            self._thread.start()

    @classmethod
    def nowhere(cls) -> MetricsOutbox:
        return cls(None, None, "")

    def add(self, rows: Iterable[dict[str, float]]) -> None:
        """Hold rows (each with a "step") until the checkpoint covering them is reported."""
        with self._changed:
            self._held.extend(stamped(row) for row in rows)

    def release(self) -> None:
        """The held rows are in a reported checkpoint: send them."""
        with self._changed:
            if self._thread is not None:
                self._outgoing.extend(self._held)
                self._changed.notify_all()
            self._held = []

    def undelivered(self) -> list[dict[str, float]]:
        """Every row the store has not confirmed, oldest first (what a checkpoint must keep)."""
        with self._changed:
            return [dict(row) for row in (*self._outgoing, *self._held)]

    def set_tags(self, tags: dict[str, str]) -> None:
        """Tags for the run, sent with the next rows."""
        with self._changed:
            if self._thread is not None:
                self._tags.update(tags)
                self._changed.notify_all()

    def close(self, wait_s: float = CLOSE_WAIT_S) -> None:
        """Wait up to `wait_s` for released rows to reach the store, then stop sending; rows left
        over are in the last checkpoint, and a warning says so."""
        if self._thread is None:
            return
        deadline = time.monotonic() + wait_s
        with self._changed:
            while (self._outgoing or self._tags) and time.monotonic() < deadline:
                self._changed.wait(timeout=deadline - time.monotonic())
            self._closing = True
            self._changed.notify_all()
            left = len(self._outgoing)
        if left:
            warn(f"tracking: {left} metric rows did not reach the store ({self._problem or 'no answer yet'}); "
                 "they are kept in the last checkpoint and sent when the run ends or is resumed")

    def _send_forever(self) -> None:
        client, after, failures = None, None, 0
        while True:
            with self._changed:
                if failures:
                    self._changed.wait(timeout=RETRY_WAITS_S[min(failures, len(RETRY_WAITS_S)) - 1])
                while not (self._outgoing or self._tags or self._closing):
                    self._changed.wait()
                if self._closing:
                    return
                rows, tags = list(self._outgoing), dict(self._tags)
            try:  # rows of an attempt that fails half-way are sent again: their stamps make that harmless
                client = client or open_client(self._uri)
                after = last_step(client, self._run_id, self._step_key) if after is None else after
                after = send_rows(client, self._run_id, rows, after)
                if tags:
                    send_tags(client, self._run_id, tags)
            except TrackingError as err:
                if self._problem is None:
                    warn(f"tracking: {err}; training goes on and the rows wait in the checkpoints")
                failures, self._problem = failures + 1, str(err)
                continue
            failures, self._problem = 0, None
            with self._changed:
                del self._outgoing[:len(rows)]
                for key, value in tags.items():
                    if self._tags.get(key) == value:
                        del self._tags[key]
                self._changed.notify_all()


def send_tags(client: Any, run_id: str, tags: dict[str, str]) -> None:
    """Set tags on a run, redacted and capped like every value a store receives."""
    from mlflow.entities import RunTag

    batch = [RunTag(k, v) for k, v in prepare_params(tags, TAG_VALUE_LIMIT).items()]
    for chunk in chunks(batch, PARAMS_PER_BATCH):
        client.log_batch(run_id, tags=chunk)
