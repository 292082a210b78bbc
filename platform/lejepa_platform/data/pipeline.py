"""The Ray Data pipeline: shards, image folders or WebDataset tars -> decoded images -> multi-crop
views, streamed into TorchTrainer workers (the only data module that imports ray).

Each training rank builds its own Dataset inside its worker (`rank_dataset`): the work items of
data/stream.py that belong to it, from the position its checkpoint recorded, in order
(`preserve_order`), so what a rank consumes is a pure function of (seed, rank, world) and a restart
continues at the exact row. A task takes a run of consecutive items (about TASK_BYTES of views) and
yields blocks of uint8 views item by item. The stream is bounded: the rank's executor may hold
about `prefetch_bytes` of views ahead of the trainer, so the data side works at the trainer's pace
instead of filling the object store with views a time-budgeted run may never use.

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
from lejepa_platform.data.reader import Plan, block_rows, describe, view_bytes
from lejepa_platform.data.stream import StreamPosition, item_blocks, rank_items, window_units

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


def stream_block_rows(cfg: DataConfig, per_worker: int) -> int:
    """Rows of one block of a rank's stream: one batch of the rank, or fewer when that exceeds
    BLOCK_BYTES. Blocks are what the stream holds in flight, so small ones keep the bound tight."""
    return max(1, min(per_worker, block_rows(cfg)))


def prefetch_bytes(cfg: DataConfig, per_worker: int) -> int:
    """Object store a rank's stream may fill ahead of its trainer: data.prefetch_batches batches, and
    never less than two blocks (with less, a task could not hand over its next block). 0: unbounded."""
    if cfg.prefetch_batches == 0:
        return 0
    row = view_bytes(cfg)
    return max(cfg.prefetch_batches * per_worker, 2 * stream_block_rows(cfg, per_worker)) * row


def units_per_task(plan: Plan, row_bytes: int) -> int:
    """Consecutive work items one task takes so that it yields about TASK_BYTES of output."""
    unit_bytes = row_bytes * plan.rows / len(plan.units)
    return max(1, int(TASK_BYTES // max(unit_bytes, 1)))


def _train_udf(batch: dict[str, np.ndarray], *, plan: Plan, cfg: DataConfig, seed: int, first: StreamPosition,
               photometric: bool, rows_per_block: int, stats: DataStats | None) -> Iterator[dict[str, np.ndarray]]:
    for index in batch["id"].tolist():
        skip = first.row if index == first.item else 0
        for block, bad, records in item_blocks(plan, cfg, seed=seed, index=index, skip=skip, photometric=photometric,
                                               rows_per_block=rows_per_block):
            if stats is not None:
                stats.add(bad, records)
            if block is not None:
                yield block


@contextlib.contextmanager
def _rank_stream(block_bytes: int, prefetch_bytes: int, reserved: dict[str, float]) -> Iterator[None]:
    """Datasets created inside deliver rows in order, keep each batch a task yields as its own block
    (Ray Data would merge them into blocks of up to 128 MB, handed over only when complete), hold at
    most about `prefetch_bytes` in the object store, and leave `reserved` (the trainers' CPUs and
    GPUs) out of what their tasks may use. A Dataset copies the current DataContext when it is
    created, so the changes end with this block."""
    ctx = ray.data.DataContext.get_current()
    previous = ctx.execution_options, ctx.target_max_block_size
    options = ray.data.ExecutionOptions(preserve_order=True, exclude_resources=ray.data.ExecutionResources(
        cpu=reserved.get("CPU", 0.0), gpu=reserved.get("GPU", 0.0)))
    if prefetch_bytes:
        options.resource_limits = ray.data.ExecutionResources(object_store_memory=prefetch_bytes)
    ctx.execution_options, ctx.target_max_block_size = options, max(block_bytes * 3 // 4, 1)
    try:
        yield
    finally:
        ctx.execution_options, ctx.target_max_block_size = previous


def rank_dataset(plan: Plan, cfg: DataConfig, *, seed: int, epochs: int, rank: int = 0, world: int = 1,
                 position: StreamPosition = StreamPosition(), photometric: bool = True, per_worker: int | None = None,
                 bounded: bool = False, reserved: dict[str, float] | None = None,
                 stats: DataStats | None = None) -> ray.data.Dataset:
    """Views of the work items of epochs [0, epochs) that rank `rank` of `world` reads, from `position` on.

    Rows carry the columns of `stream.item_blocks`, in the rank's order; with photometric=False
    only the geometric crops are made and the trainer applies the rest (`views.augment_views`).
    Blocks hold one batch of `per_worker` rows (default: data.batch_size); with `bounded`, the stream
    runs at most about data.prefetch_batches batches ahead of its consumer (`prefetch_bytes`).
    """
    items = rank_items(plan, cfg, epochs=epochs, rank=rank, world=world, first=position.item)
    if not items:
        raise ValueError(f"rank {rank} has no work items left from item {position.item} in {epochs} epochs")
    batch = per_worker or cfg.batch_size
    rows_per_block = stream_block_rows(cfg, batch)
    per_task = units_per_task(plan, view_bytes(cfg)) // window_units(cfg) or 1
    with _rank_stream(rows_per_block * view_bytes(cfg), prefetch_bytes(cfg, batch) if bounded else 0, reserved or {}):
        ids = ray.data.from_items([{"id": i} for i in items], override_num_blocks=min(math.ceil(len(items) / per_task),
                                                                                     MAX_TASKS))
        return ids.map_batches(_train_udf, batch_size=None, batch_format="numpy", zero_copy_batch=True,
                               fn_kwargs={"plan": plan, "cfg": cfg, "seed": seed, "first": position,
                                          "photometric": photometric, "rows_per_block": rows_per_block,
                                          "stats": stats})
