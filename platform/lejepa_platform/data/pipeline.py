"""A rank's training stream on Ray: its work items of data/stream.py, as views built by Ray tasks, in
order, batched for its trainer (the only data module that imports ray).

`rank_batches` runs in the trainer's process. It cuts each of the rank's work items into blocks of
rows, from the position its checkpoint recorded, and keeps a fixed number of block tasks in flight:
Ray runs them on whatever CPUs the trainers leave free (its default policy prefers the submitting
node while that has free CPUs; a node affinity would queue them behind a full node instead of
letting an autoscaler add one; named explicitly, the default also keeps them out of a sweep trial's
placement group, which would capture them otherwise and has no CPU left for them), and the
consumer takes their results in submission order. What a rank consumes is therefore a pure function
of (seed, rank, world), a restart continues at the exact row, and the data side runs at most
data.prefetch_batches batches ahead of the trainer, so a time-budgeted run builds no views it will
not use.

Why plain tasks and not a Ray Data Dataset: with an ordered, bounded stream per rank, Ray Data's
streaming executor polls without waiting whenever its only operator is backpressured and busied
most of a core per rank doing so, which on a small machine starved the trainer
(docs/data-stream.md). The tasks here wait on nothing but their inputs.

Bad records: each task returns (records read, skip reasons) with its block; the consumer adds them
up and hands the totals to a `DataStats` actor when the caller passes one (every STATS_EVERY
blocks and when the stream closes); `stats.log_summary()` logs one line with the totals.

Priority: a view task's process lowers its own priority (VIEW_TASK_NICENESS) once. On a node
whose cores the trainers' threads use, the views are then built in the moments those threads wait,
instead of preempting one of them and stalling the others at their next barrier.
"""

from __future__ import annotations

import collections
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator

import numpy as np
import ray
import torch

from lejepa_platform.config import DataConfig
from lejepa_platform.data.reader import Plan, Unit, block_rows, describe, unit_rows
from lejepa_platform.data.stream import LoadedItem, StreamPosition, block_views, load_item, rank_items, work_item
from lejepa_platform.ray_env import on_this_node

log = logging.getLogger("lejepa_platform.data")

VIEW_TASK_NAME = "lejepa_view_block"
"""Name of the Ray tasks that build views (their processes' titles read ray::<name> while they run)."""
VIEW_TASK_NICENESS = 10
"""Niceness of the processes that run view tasks (the trainers run at 0: ray_env.JOB_ENV_VARS)."""
STATS_EVERY = 64
"""Blocks between two hand-overs of a rank's record counts to its DataStats."""
LOADED_ITEMS_KEPT = 2
"""Work items a task's process keeps loaded: the blocks of one item usually run one after another
in the same process, which then reads the item's records once instead of once per block."""


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
        self._tally = _Tally.options(**on_this_node()).remote()  # created by the driver, lives on its node

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
    """Rows of one block task: half of data.prefetch_batches batches of the rank, so that two blocks
    (one being consumed, one being built) hold the prefetch, but at most `reader.block_rows` (about
    BLOCK_BYTES of views). Large blocks spread each task's fixed cost over many rows."""
    return max(1, min(cfg.prefetch_batches * per_worker // 2, block_rows(cfg)))


def blocks_in_flight(cfg: DataConfig, per_worker: int) -> int:
    """Block tasks a rank keeps submitted: data.prefetch_batches batches, and at least two blocks."""
    return max(2, math.ceil(cfg.prefetch_batches * per_worker / stream_block_rows(cfg, per_worker)))


_loaded: collections.OrderedDict[tuple, LoadedItem] = collections.OrderedDict()


def _loaded_item(plan: Plan, cfg: DataConfig, seed: int, index: int) -> LoadedItem:
    key = (plan.source, plan.split, plan.rows, cfg.shuffle_buffer, seed, index)
    if key not in _loaded:
        _loaded[key] = load_item(plan, cfg, seed, index)
        while len(_loaded) > LOADED_ITEMS_KEPT:
            _loaded.popitem(last=False)
    return _loaded[key]


@ray.remote(num_cpus=1)
def _block_task(plan: Plan, cfg: DataConfig, seed: int, index: int, start: int, rows: int,
                photometric: bool) -> tuple[dict[str, np.ndarray] | None, Counter, int]:
    _lower_priority()
    return block_views(_loaded_item(plan, cfg, seed, index), cfg, seed=seed, start=start, rows=rows,
                       photometric=photometric)


def _lower_priority() -> None:
    """Raise this process's niceness to VIEW_TASK_NICENESS (once: niceness only goes up)."""
    current = os.nice(0)
    if current < VIEW_TASK_NICENESS:
        os.nice(VIEW_TASK_NICENESS - current)


def _block_requests(plan: Plan, cfg: DataConfig, *, seed: int, epochs: int, rank: int, world: int,
                    position: StreamPosition, rows: int) -> Iterator[tuple[int, int]]:
    """(item, first row) of each block of the rank's stream, in order, from `position` on. A unit's
    row count is looked up once per stream, not once per epoch (a split of shards reads ids for it)."""
    counts: dict[Unit, int] = {}
    for index in rank_items(plan, cfg, epochs=epochs, rank=rank, world=world, first=position.item):
        units = work_item(plan, cfg, seed, index).units
        for unit in units:
            if unit not in counts:
                counts[unit] = unit_rows(unit, plan)
        skip = position.row if index == position.item else 0
        yield from ((index, start) for start in range(skip, sum(counts[unit] for unit in units), rows))


def rank_blocks(plan: Plan, cfg: DataConfig, *, seed: int, epochs: int, rank: int = 0, world: int = 1,
                position: StreamPosition = StreamPosition(), photometric: bool = True, rows: int | None = None,
                in_flight: int = 2, stats: DataStats | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Blocks of views of the work items of epochs [0, epochs) that rank `rank` of `world` reads, from
    `position` on, in the rank's order: `rows` records each (default `reader.block_rows`; fewer at an
    item's end or where records were bad), built by `in_flight` Ray tasks at a time.

    Columns are those of `stream.block_views`; with photometric=False only the geometric crops are
    made and the trainer applies the rest (`views.augment_views`).
    """
    if not rank_items(plan, cfg, epochs=epochs, rank=rank, world=world, first=position.item):
        raise ValueError(f"rank {rank} has no work items left from item {position.item} in {epochs} epochs")
    rows = rows or block_rows(cfg)
    requests = _block_requests(plan, cfg, seed=seed, epochs=epochs, rank=rank, world=world, position=position,
                               rows=rows)
    task = _block_task.options(name=VIEW_TASK_NAME, scheduling_strategy="DEFAULT")
    plan_ref = ray.put(plan)
    submitted: collections.deque = collections.deque()

    def submit() -> None:
        request = next(requests, None)
        if request is not None:
            submitted.append(task.remote(plan_ref, cfg, seed, *request, rows, photometric))

    bad, records, unreported = Counter(), 0, 0
    try:
        for _ in range(max(1, in_flight)):
            submit()
        while submitted:
            block, block_bad, block_records = ray.get(submitted.popleft())
            submit()
            bad.update(block_bad)
            records, unreported = records + block_records, unreported + 1
            if stats is not None and unreported >= STATS_EVERY:
                stats.add(bad, records)
                bad, records, unreported = Counter(), 0, 0
            if block is not None:
                yield block
    finally:
        if stats is not None and unreported:
            stats.add(bad, records)


def rank_batches(plan: Plan, cfg: DataConfig, *, seed: int, epochs: int, batch_rows: int, rank: int = 0,
                 world: int = 1, position: StreamPosition = StreamPosition(), photometric: bool = True,
                 pin_memory: bool = False, stats: DataStats | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """The rank's stream (`rank_blocks`) as batches of `batch_rows` rows, at most data.prefetch_batches
    batches built ahead of the consumer; with pin_memory, in page-locked memory for a non-blocking
    copy to a GPU."""
    blocks = rank_blocks(plan, cfg, seed=seed, epochs=epochs, rank=rank, world=world, position=position,
                         photometric=photometric, rows=stream_block_rows(cfg, batch_rows),
                         in_flight=blocks_in_flight(cfg, batch_rows), stats=stats)
    return rebatch(blocks, batch_rows, pin_memory=pin_memory)


def rebatch(blocks: Iterable[dict[str, np.ndarray]], rows: int, *,
            pin_memory: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of exactly `rows` rows cut from consecutive blocks, in order (a last partial batch is
    dropped); each batch is copied once, into pinned memory when asked."""
    pending: list[dict[str, np.ndarray]] = []
    held = 0
    for block in blocks:
        pending.append(block)
        held += len(next(iter(block.values())))
        while held >= rows:
            batch, pending = _take(pending, rows, pin_memory)
            held -= rows
            yield batch


def _take(blocks: list[dict[str, np.ndarray]], rows: int,
          pin_memory: bool) -> tuple[dict[str, torch.Tensor], list[dict[str, np.ndarray]]]:
    """The first `rows` rows of `blocks` as one batch of tensors, and the blocks that remain."""
    parts, rest, need = [], [], rows
    for block in blocks:
        size = len(next(iter(block.values())))
        if need >= size:
            parts.append(block)
        elif need > 0:
            parts.append({k: v[:need] for k, v in block.items()})
            rest.append({k: v[need:] for k, v in block.items()})
        else:
            rest.append(block)
        need -= min(need, size)
    batch = {}
    for key, first in parts[0].items():
        dtype = torch.from_numpy(first[:0].copy()).dtype  # a copy: blocks from the object store are read-only
        out = torch.empty((rows, *first.shape[1:]), dtype=dtype, pin_memory=pin_memory)
        np.concatenate([part[key] for part in parts], out=out.numpy())
        batch[key] = out
    return batch, rest
