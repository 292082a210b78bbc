"""The Ray Data pipeline: shards, image folders or WebDataset tars -> decoded images -> multi-crop
views, streamed into TorchTrainer workers (the only data module that imports ray).

Shape of the stream: the work items are (epoch, unit) pairs in epoch-major order, each epoch's units
permuted by (seed, epoch); a task takes a run of consecutive items (about TASK_BYTES of views) and,
item by item, reads the unit, shuffles its rows, decodes them (bad records skipped) and yields
blocks of uint8 views. Epochs therefore follow one another in one finite dataset instead of a
union of per-epoch reads, which Ray Data would execute concurrently. Views depend only on (seed,
epoch, record id), so a run is reproducible whatever the order tasks finish in. Consumers add a
local shuffle buffer (`iter_torch_batches(..., local_shuffle_buffer_size=...)`) and normalise on
their device with `views.normalize`.

Bad records: each task reports (records read, skip reasons) to a `DataStats` actor when the caller
passes one, before yielding the block they belong to; after the stream is consumed,
`stats.log_summary()` logs one line with the totals. Without a DataStats, tasks skip bad records
and log nothing.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import Counter
from collections.abc import Iterator

import numpy as np
import ray

from lejepa_platform.config import DataConfig
from lejepa_platform.data.reader import (BLOCK_BYTES, Plan, describe, epoch_units, eval_blocks, plan_source,
                                         train_blocks, view_bytes)

log = logging.getLogger("lejepa_platform.data")

TASK_BYTES = 64 * 2**20
"""About how many bytes of views one Ray Data task produces: consecutive work items are grouped up to
it. Between one task's end and the next one's start a CPU sits idle for a moment; with units that
take a fraction of a second (small images) that gap cost a third of the throughput (measured:
embedded dataset, 2 CPUs, one unit per task 2.2k img/s, 13 units per task 3.9k img/s)."""
MAX_TASKS = 10_000
"""Upper bound on the tasks of one dataset (beyond it each task takes more units)."""


@ray.remote(num_cpus=0)
class _Tally:
    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def add(self, counts: dict) -> None:
        self.counts.update(counts)

    def get(self) -> dict:
        return dict(self.counts)


class DataStats:
    """Totals of records read and skipped, collected from every task of a pipeline by a small actor."""

    def __init__(self) -> None:
        self._tally = _Tally.remote()

    def add(self, bad: Counter, records: int) -> None:
        ray.get(self._tally.add.remote({"records": records, **bad}))

    def summary(self) -> dict:
        """{"records": n, "skipped": n, "reasons": {reason: n}}."""
        counts = Counter(ray.get(self._tally.get.remote()))
        reasons = {k: v for k, v in sorted(counts.items()) if k != "records"}
        return {"records": counts.get("records", 0), "skipped": sum(reasons.values()), "reasons": reasons,
                "line": describe(counts)}

    def log_summary(self, logger: logging.Logger | None = None) -> dict:
        """Log one line (a warning when records were skipped) and return the summary."""
        summary = self.summary()
        (logger or log).log(logging.WARNING if summary["skipped"] else logging.INFO, "data: %s", summary["line"])
        return summary


@contextlib.contextmanager
def _streamed_blocks() -> Iterator[None]:
    """Datasets created inside keep each batch a task yields as its own block (about BLOCK_BYTES),
    instead of Ray Data's default of merging them into blocks of up to 128 MB: consumers then get
    views while the task is still running, and object store use stays small. A Dataset copies the
    current DataContext when it is created, so the change ends with this block."""
    ctx = ray.data.DataContext.get_current()
    previous = ctx.target_max_block_size
    ctx.target_max_block_size = BLOCK_BYTES * 3 // 4
    try:
        yield
    finally:
        ctx.target_max_block_size = previous


def units_per_task(plan: Plan, row_bytes: int) -> int:
    """Consecutive work items one task takes so that it yields about TASK_BYTES of output."""
    unit_bytes = row_bytes * plan.rows / len(plan.units)
    return max(1, int(TASK_BYTES // max(unit_bytes, 1)))


def _units_dataset(items: int, plan: Plan, row_bytes: int) -> ray.data.Dataset:
    """Work item indices, one block per task; the map over them uses batch_size=None so Ray Data
    fuses it with this read into one task (a fixed batch size would keep them apart and idle a CPU)."""
    blocks = math.ceil(items / units_per_task(plan, row_bytes))
    return ray.data.range(items, override_num_blocks=min(blocks, MAX_TASKS))


def _train_udf(batch: dict[str, np.ndarray], *, plan: Plan, cfg: DataConfig, seed: int, start_epoch: int,
               stats: DataStats | None) -> Iterator[dict[str, np.ndarray]]:
    per_epoch = len(plan.units)
    for item in batch["id"].tolist():
        epoch = start_epoch + item // per_epoch
        unit = epoch_units(plan, seed, epoch)[item % per_epoch]
        for block, bad, records in train_blocks(unit, plan, cfg, seed=seed, epoch=epoch):
            if stats is not None:
                stats.add(bad, records)
            if block is not None:
                yield block


def _eval_udf(batch: dict[str, np.ndarray], *, plan: Plan, size: int, max_pixels: int,
              stats: DataStats | None) -> Iterator[dict[str, np.ndarray]]:
    for item in batch["id"].tolist():
        for block, bad, records in eval_blocks(plan.units[item], plan, size, max_pixels):
            if stats is not None:
                stats.add(bad, records)
            if block is not None:
                yield block


def train_dataset(cfg: DataConfig, *, seed: int, epochs: int, start_epoch: int = 0,
                  stats: DataStats | None = None) -> ray.data.Dataset:
    """Views for epochs [start_epoch, epochs), one epoch after another, as one finite Dataset.

    Rows: "global" uint8 (G, 3, Hg, Hg), "local" uint8 (L, 3, Hl, Hl) only when L > 0, "label" int64
    (-1 when unlabelled). cfg.split selects rows through the manifest's fixed split (see reader).
    """
    if epochs <= start_epoch:
        raise ValueError(f"epochs = {epochs} must be greater than start_epoch = {start_epoch}")
    plan = plan_source(cfg.source, cfg.split)
    items = (epochs - start_epoch) * len(plan.units)
    with _streamed_blocks():
        return _units_dataset(items, plan, view_bytes(cfg)).map_batches(
            _train_udf, batch_size=None, batch_format="numpy", zero_copy_batch=True,
            fn_kwargs={"plan": plan, "cfg": cfg, "seed": seed, "start_epoch": start_epoch, "stats": stats})


def eval_dataset(source: str, split: str, size: int, *, max_image_pixels: int = DataConfig().max_image_pixels,
                 stats: DataStats | None = None) -> ray.data.Dataset:
    """One pass of evaluation views: "image" uint8 (3, S, S) (centre crop), "label" int64."""
    plan = plan_source(source, split)
    with _streamed_blocks():
        return _units_dataset(len(plan.units), plan, 3 * size * size).map_batches(
            _eval_udf, batch_size=None, batch_format="numpy", zero_copy_batch=True,
            fn_kwargs={"plan": plan, "size": size, "max_pixels": max_image_pixels, "stats": stats})


def count_rows(cfg: DataConfig) -> int:
    """Rows in cfg.split (from the manifest when there is one: no image is read)."""
    return plan_source(cfg.source, cfg.split).rows
