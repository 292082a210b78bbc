"""A rank's training stream on Ray Data: its work items of data/stream.py read, decoded and cropped
(and, with data.augment_on = data, photometrically augmented) by Ray Data operators, in order,
batched for its trainer. The only data module of the training stream that imports ray.

`rank_batches` runs in the trainer's process. The rank's part of the run's order, from the position
its checkpoint recorded, is cut into block requests (item, first row); each run of SEGMENT_BLOCKS
requests becomes one Dataset:

    ReadLejepaRecords (one read task per request: the block's rows of its work item, still encoded)
      -> MapBatches(lejepa_views) (decode, bad records counted and dropped, crops, photometric ops)

fused into one task per block, executed with preserve_order, read through `iter_batches`, then cut
into batches of exactly the rank's rows (`rebatch`, pinned for a GPU). What a rank consumes is a
pure function of (seed, rank, world), and a restart continues at the exact row: the order is this
project's, Ray Data only executes it (it has no mid-epoch iterator resume of its own).

Backpressure: the Dataset's object-store budget (`ExecutionOptions.resource_limits`) is
data.prefetch_batches batches of views, which Ray Data counts over queued outputs and the outputs of
running tasks, so a time-budgeted run builds no views it will not use; the iterator prefetches one
block on top. Each block is half the prefetch, so two are in flight. Why segments and not one
Dataset per run: a Dataset puts every read task into the object store when it starts.

Ray Data's executor runs in this process. `IdleBackoff` makes it sleep IDLE_BACKOFF_S after a
scheduling step in which nothing changed: Ray 2.60's loop does not wait when no task runs and none
may start, nor when every finished output is held back by the budget (docs/data-stream.md). The
no-progress guard is off: a trainer that pauses (an evaluation, a slow checkpoint) must not end its
stream.

Scheduling: the view tasks take Ray's DEFAULT policy (Ray Data's own default is SPREAD): the
trainer's node while it has free CPUs, other nodes when it is full, so an autoscaler can add nodes
for them; named explicitly, it also keeps them out of a sweep trial's placement group. A view
task's process lowers its own priority (VIEW_TASK_NICENESS) once, and keeps the last work items it
loaded (LOADED_ITEMS_KEPT).

Figures: every task adds its record counts to the run's `DataStats` actor (exact bad-record counts
whatever was consumed); each rank hands over its stream's `Dataset.stats()` and key numbers when
the stream closes.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.data import Datasource, ExecutionResources, ReadTask
from ray.data._internal.execution.execution_callback import ExecutionCallback
from ray.data.block import BlockMetadata

from lejepa_platform.config import DataConfig
from lejepa_platform.console import quieter
from lejepa_platform.data.reader import Plan, Unit, block_rows, describe, unit_rows, view_bytes
from lejepa_platform.data.stream import (LoadedItem, StreamPosition, block_records, load_item, rank_items, records_views,
                                         work_item)
from lejepa_platform.ray_env import on_this_node

log = logging.getLogger("lejepa_platform.data")

VIEW_OPERATOR = "LejepaRecords"
"""Part of the name of every view task (Ray names them after the fused operators, e.g.
ReadLejepaRecords->MapBatches(lejepa_views)), and of their processes' titles while they run."""
VIEW_TASK_NICENESS = 10
"""Niceness of the processes that run view tasks (the trainers run at 0: ray_env.JOB_ENV_VARS)."""
LOADED_ITEMS_KEPT = 2
"""Work items a task's process keeps loaded: the blocks of one item usually run one after another
in the same process, which then reads the item's records once instead of once per block."""
SEGMENT_BLOCKS = 512
"""Block requests per Dataset of a rank's stream."""
IDLE_BACKOFF_S = (0.02, 0.2)
"""Sleep of Ray Data's scheduling loop after a step in which nothing changed: the first, doubled
after every further such step, up to the second; back to none once something changes."""
HOST_COLUMNS = ("uid", "item", "row")
"""Batch columns the trainer reads on the host (record ids, positions): kept as NumPy arrays."""
PARAM_BYTES = 14 * 4
"""Bytes of one view's photometric random numbers (with data.augment_on = device)."""


@ray.remote(num_cpus=0)
class _Tally:
    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.streams: dict[int, dict] = {}

    def add(self, counts: dict) -> None:
        self.counts.update(counts)

    def get(self) -> dict:
        return dict(self.counts)

    def add_stream(self, rank: int, stream: dict) -> None:
        self.streams[rank] = stream

    def get_streams(self) -> dict[int, dict]:
        return dict(self.streams)


class DataStats:
    """A pipeline's record counts (added by every view task) and each rank's stream figures."""

    def __init__(self) -> None:
        self._tally = _Tally.options(**on_this_node()).remote()  # created by the driver, lives on its node

    def add(self, bad: Counter, records: int) -> None:
        ray.get(self._tally.add.remote({"records": records, **bad}))

    def summary(self) -> dict:
        """{"records": n, "skipped": n, "reasons": {reason: n}, "line": one line}."""
        counts = Counter(ray.get(self._tally.get.remote()))
        reasons = {k: v for k, v in sorted(counts.items()) if k != "records"}
        return {"records": counts.get("records", 0), "skipped": sum(reasons.values()), "reasons": reasons,
                "line": describe(counts)}

    def log_summary(self, logger: logging.Logger | None = None) -> dict:
        """Log one line (a warning when records were skipped) and return the summary."""
        summary = self.summary()
        (logger or log).log(logging.WARNING if summary["skipped"] else logging.INFO, "data: %s", summary["line"])
        return summary

    def add_stream(self, rank: int, figures: StreamFigures) -> None:
        ray.get(self._tally.add_stream.remote(rank, dataclasses.asdict(figures)))

    def streams(self) -> dict[int, StreamFigures]:
        """Each rank's stream figures, as its latest attempt handed them over."""
        return {rank: StreamFigures(**value) for rank, value in ray.get(self._tally.get_streams.remote()).items()}


@dataclasses.dataclass
class StreamFigures:
    """What Ray Data measured of one rank's stream, summed over its Datasets."""

    rows: int = 0
    """Rows the stream delivered to the trainer."""
    seconds: float = 0.0
    """Wall time from the first request to the stream's end."""
    task_cpu_s: float = 0.0
    """CPU time of the view tasks."""
    consumer_wait_s: float = 0.0
    """Time the trainer waited for views (the data side was the bottleneck)."""
    backpressure_s: float = 0.0
    """Time Ray Data held tasks back because the views built ahead filled the budget."""
    text: str = ""
    """`Dataset.stats()` of the stream's latest Dataset."""

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def add(self, dataset: ray.data.Dataset) -> None:
        """Add a finished (or closed) Dataset's figures."""
        summary = dataset._get_stats_summary()
        extra = summary.extra_metrics or {}
        self.task_cpu_s += sum(op.cpu_time.sum for op in summary.operators_stats if op.cpu_time is not None)
        if summary.iter_stats is not None:
            self.consumer_wait_s += summary.iter_stats.blocked_production_wait_time.get()
        self.backpressure_s += float(extra.get("task_submission_backpressure_time", 0.0))
        self.text = dataset.stats()


class IdleBackoff(ExecutionCallback):
    """Backs Ray Data's scheduling loop off while it has nothing to do: after a step that changed
    nothing (no output taken, no block queued or dequeued, no task started or finished: the state
    Ray's own no-progress guard compares) it sleeps, longer the longer nothing changes
    (IDLE_BACKOFF_S), and not at all once something does, so a trainer waiting for data is served
    at once."""

    def before_execution_starts(self, executor: Any) -> None:
        self._last: tuple | None = None
        self._sleep_s = 0.0

    def on_execution_step(self, executor: Any) -> None:
        state = tuple((op.metrics.num_outputs_taken, op_state.total_enqueued_input_blocks(),
                       op_state.total_enqueued_output_blocks(), op.num_active_tasks())
                      for op, op_state in executor._topology.items())
        shortest, longest = IDLE_BACKOFF_S
        self._sleep_s = min(longest, max(shortest, 2 * self._sleep_s)) if state == self._last else 0.0
        self._last = state
        if self._sleep_s:
            time.sleep(self._sleep_s)


def pin_ray_data_actors() -> None:
    """Execute a one-row Dataset in this process (the driver). Ray Data creates its cluster-wide
    detached actors (stats, autoscaling coordinator) on the node of the first process that executes
    a Dataset and keeps them there; created by a trainer on a worker node instead, they would keep
    that node busy for good, and an autoscaler could never remove it (tests/e2e/test_autoscaling.py)."""
    dataset = ray.data.range(1)
    dataset.context.enable_progress_bars = False
    dataset.context.print_on_execution_start = False
    with quieter("ray.data", logging.ERROR):  # its "progress bars disabled" and "execution finished" lines
        dataset.take_all()


def stream_block_rows(cfg: DataConfig, per_worker: int) -> int:
    """Rows of one view block: half of data.prefetch_batches batches of the rank, so that two blocks
    (one being consumed, one being built) hold the prefetch, but at most `reader.block_rows` (about
    BLOCK_BYTES of views). Large blocks spread each task's fixed cost over many rows."""
    return max(1, min(cfg.prefetch_batches * per_worker // 2, block_rows(cfg)))


def row_bytes(cfg: DataConfig, photometric: bool) -> int:
    """Bytes one training row takes in a block of views (uint8 views, their photometric numbers when
    the trainer applies them, and four int64 columns)."""
    return view_bytes(cfg) + (0 if photometric else cfg.num_views * PARAM_BYTES) + 4 * 8


def prefetch_budget(cfg: DataConfig, per_worker: int, photometric: bool) -> int:
    """Object-store bytes a rank's stream may hold ahead of its trainer: data.prefetch_batches
    batches, and never less than two blocks."""
    rows = max(cfg.prefetch_batches * per_worker, 2 * stream_block_rows(cfg, per_worker))
    return rows * row_bytes(cfg, photometric)


_loaded: collections.OrderedDict[tuple, LoadedItem] = collections.OrderedDict()


def _loaded_item(plan: Plan, cfg: DataConfig, seed: int, index: int) -> LoadedItem:
    key = (plan.source, plan.split, plan.rows, cfg.shuffle_buffer, seed, index)
    if key not in _loaded:
        _loaded[key] = load_item(plan, cfg, seed, index)
        while len(_loaded) > LOADED_ITEMS_KEPT:
            _loaded.popitem(last=False)
    return _loaded[key]


def _lower_priority() -> None:
    """Raise this process's niceness to VIEW_TASK_NICENESS (once: niceness only goes up)."""
    current = os.nice(0)
    if current < VIEW_TASK_NICENESS:
        os.nice(VIEW_TASK_NICENESS - current)


def _read_records(plan_ref: ray.ObjectRef, cfg: DataConfig, seed: int, index: int, start: int,
                  rows: int) -> list[pa.Table]:
    _lower_priority()
    plan = ray.get(plan_ref)
    return [pa.table(block_records(_loaded_item(plan, cfg, seed, index), start, rows))]


class RecordBlocks(Datasource):
    """One read task per block request (item, first row): that block's records, still encoded."""

    def __init__(self, plan_ref: ray.ObjectRef, cfg: DataConfig, seed: int, requests: list[tuple[int, int]],
                 rows: int) -> None:
        super().__init__()
        self._plan_ref, self._cfg, self._seed, self._requests, self._rows = plan_ref, cfg, seed, requests, rows

    def get_name(self) -> str:
        return VIEW_OPERATOR

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        return [ReadTask(functools.partial(_read_records, self._plan_ref, self._cfg, self._seed, index, start,
                                           self._rows),
                         BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None))
                for index, start in self._requests]


def lejepa_views(records: dict[str, np.ndarray], *, cfg: DataConfig, seed: int, photometric: bool,
                 stats: DataStats | None) -> Iterator[dict[str, np.ndarray]]:
    """The Ray Data map over one block of records: its views (nothing when every record was bad)."""
    batch, bad, records_read = records_views(records, cfg, seed=seed, photometric=photometric)
    if stats is not None:
        stats.add(bad, records_read)
    if batch is not None:
        yield batch


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


def _segment(plan_ref: ray.ObjectRef, cfg: DataConfig, *, seed: int, requests: list[tuple[int, int]], rows: int,
             photometric: bool, budget: int, stats: DataStats | None) -> ray.data.Dataset:
    """One Dataset of the rank's stream: the views of `requests`, in order, within `budget` bytes."""
    placement = {"scheduling_strategy": "DEFAULT"}
    with warnings.catch_warnings():  # Ray 2.60 has no other way to set a scheduling strategy
        warnings.simplefilter("ignore", DeprecationWarning)
        dataset = ray.data.read_datasource(RecordBlocks(plan_ref, cfg, seed, requests, rows),
                                           override_num_blocks=len(requests), ray_remote_args=placement)
        dataset = dataset.map_batches(lejepa_views, batch_size=None, batch_format="numpy", zero_copy_batch=True,
                                      fn_kwargs={"cfg": cfg, "seed": seed, "photometric": photometric,
                                                 "stats": stats}, **placement)
    context = dataset.context
    context.execution_options.preserve_order = True
    context.execution_options.resource_limits = ExecutionResources(object_store_memory=budget)
    context.execution_no_progress_timeout_s = -1
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.custom_execution_callback_classes = [*context.custom_execution_callback_classes, IdleBackoff]
    return dataset


def rank_blocks(plan: Plan, cfg: DataConfig, *, seed: int, epochs: int, rank: int = 0, world: int = 1,
                position: StreamPosition = StreamPosition(), photometric: bool = True, rows: int | None = None,
                budget: int | None = None, stats: DataStats | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Blocks of views of the work items of epochs [0, epochs) that rank `rank` of `world` reads, from
    `position` on, in the rank's order: `rows` records each (default `reader.block_rows`; fewer at an
    item's end or where records were bad), at most `budget` bytes built ahead (default two blocks).

    Columns are those of `stream.records_views`; with photometric=False only the geometric crops are
    made and the trainer applies the rest (`views.augment_views`). With `stats`, the view tasks add
    their record counts to it and the stream hands over its figures when it closes.
    """
    if not rank_items(plan, cfg, epochs=epochs, rank=rank, world=world, first=position.item):
        raise ValueError(f"rank {rank} has no work items left from item {position.item} in {epochs} epochs")
    rows = rows or block_rows(cfg)
    budget = budget or 2 * rows * row_bytes(cfg, photometric)
    requests = _block_requests(plan, cfg, seed=seed, epochs=epochs, rank=rank, world=world, position=position,
                               rows=rows)
    plan_ref = ray.put(plan)
    figures, started = StreamFigures(), time.perf_counter()
    try:
        while segment := list(itertools.islice(requests, SEGMENT_BLOCKS)):
            dataset = _segment(plan_ref, cfg, seed=seed, requests=segment, rows=rows, photometric=photometric,
                               budget=budget, stats=stats)
            blocks = iter(dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1))
            try:
                for block in blocks:
                    figures.rows += len(block["uid"])
                    yield block
            finally:  # also when the trainer stops in the middle of a segment: Ray Data stops the executor
                blocks.close()
                figures.add(dataset)
    finally:
        figures.seconds = time.perf_counter() - started
        if stats is not None:
            stats.add_stream(rank, figures)


def rank_batches(plan: Plan, cfg: DataConfig, *, seed: int, epochs: int, batch_rows: int, rank: int = 0,
                 world: int = 1, position: StreamPosition = StreamPosition(), photometric: bool = True,
                 pin_memory: bool = False, stats: DataStats | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """The rank's stream (`rank_blocks`) as batches of `batch_rows` rows, at most data.prefetch_batches
    batches built ahead of the consumer; with pin_memory, in page-locked memory for a non-blocking
    copy to a GPU."""
    blocks = rank_blocks(plan, cfg, seed=seed, epochs=epochs, rank=rank, world=world, position=position,
                         photometric=photometric, rows=stream_block_rows(cfg, batch_rows),
                         budget=prefetch_budget(cfg, batch_rows, photometric), stats=stats)
    return rebatch(blocks, batch_rows, pin_memory=pin_memory)


def rebatch(blocks: Iterable[dict[str, np.ndarray]], rows: int, *,
            pin_memory: bool = False) -> Iterator[dict[str, torch.Tensor | np.ndarray]]:
    """Batches of exactly `rows` rows cut from consecutive blocks, in order (a last partial batch is
    dropped); each batch is copied once, the columns that go to the device (views, their numbers,
    labels) into tensors, pinned when asked, the HOST_COLUMNS into NumPy arrays (reading them never
    touches a device). Closing it closes `blocks`."""
    pending: list[dict[str, np.ndarray]] = []
    held = 0
    try:
        for block in blocks:
            pending.append(block)
            held += len(next(iter(block.values())))
            while held >= rows:
                batch, pending = _take(pending, rows, pin_memory)
                held -= rows
                yield batch
    finally:
        close = getattr(blocks, "close", None)
        if close is not None:
            close()


def _take(blocks: list[dict[str, np.ndarray]], rows: int,
          pin_memory: bool) -> tuple[dict[str, torch.Tensor | np.ndarray], list[dict[str, np.ndarray]]]:
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
    batch: dict[str, torch.Tensor | np.ndarray] = {}
    for key, first in parts[0].items():
        if key in HOST_COLUMNS:
            batch[key] = np.concatenate([part[key] for part in parts])
            continue
        dtype = torch.from_numpy(first[:0].copy()).dtype  # a copy: blocks from the object store are read-only
        out = torch.empty((rows, *first.shape[1:]), dtype=dtype, pin_memory=pin_memory)
        np.concatenate([part[key] for part in parts], out=out.numpy())
        batch[key] = out
    return batch, rest
