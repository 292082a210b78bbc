"""A source's units as a Ray Data dataset: the reads of the cluster-scale data jobs.

`read_units` gives Ray Data one read task per unit of a plan (data/reader.py) through
`UnitsDatasource`; the task runs a function of (unit, plan) that yields Arrow tables, so the shard
build reads converted records and
`lejepa embed` reads encoded images with their place in the source, through the same reader as
training and evaluation. `join_ray` connects a data job to its cluster.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator

import pyarrow as pa
import ray
from ray.data import DataContext, Datasource, ReadTask
from ray.data.block import BlockMetadata

from lejepa_platform.data.reader import Plan, Unit
from lejepa_platform.ray_env import init_ray

ReadUnit = Callable[[Unit, Plan], Iterator[pa.Table]]


class UnitsDatasource(Datasource):
    """One read task per unit of `plan`, running `read(unit, plan)` (a picklable function)."""

    def __init__(self, plan: Plan, read: ReadUnit) -> None:
        super().__init__()
        self.plan, self.read = plan, read

    def get_name(self) -> str:
        return "ReadUnits"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: DataContext | None = None) -> list[ReadTask]:
        """Every unit is a task of its own (units are already a few hundred records), whatever `parallelism` asks."""
        plan, read = self.plan, self.read
        return [ReadTask(lambda unit=unit: read(unit, plan),
                         BlockMetadata(num_rows=unit.rows, size_bytes=None, input_files=[unit.path], exec_stats=None),
                         per_task_row_limit=per_task_row_limit)
                for unit in plan.units]


def read_units(plan: Plan, read: ReadUnit) -> ray.data.Dataset:
    """A dataset of `read(unit, plan)` over every unit, one block per unit read (not cut smaller:
    units are already small, and more blocks only add per-block overhead downstream)."""
    return ray.data.read_datasource(UnitsDatasource(plan, read), override_num_blocks=len(plan.units))


def join_ray(address: str, *, min_cpus: int = 1) -> None:
    """Connect to the cluster at `address` ("local": start one here, offering at least `min_cpus`
    CPUs), unless this process is connected already; Ray Data's progress bars off (commands print
    their own lines)."""
    if not ray.is_initialized():
        if address == "local":
            init_ray(None, num_cpus=max(os.cpu_count() or 1, min_cpus), include_dashboard=False)
        else:
            init_ray(address)
    DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # its notice that the bars are off

