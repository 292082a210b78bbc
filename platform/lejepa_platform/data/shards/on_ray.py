"""`lejepa shards build` on Ray Data: the source's units read and converted by parallel Ray Data
tasks, the shards written by Ray Data write tasks, across a cluster.

Read tasks (data/ray_units.py, one per unit of data/reader.py's plan) turn each record into the
bytes a shard holds, or a skip reason, with convert.py's `convert_record`: the function the
single-process build calls, so both builds keep the same records as the same bytes. `ShardSink`
is a Ray Data datasink: each write task gets about `rows_per_shard` records in source order
(`min_rows_per_write`, with the dataset's order preserved, so a rebuild gives the same shards),
writes the kept ones as one shard `part-<task>.parquet` with convert.py's `write_shard`, and returns
what the manifest needs (rows, digest, labels, split keys, skip counts); build.py makes the manifest
from those with the same code as for the single-process build. Ray's own Parquet sink reports none
of this, hence a sink of our own.

The shards go where build.py says (its OUT.partial staging directory, or straight under a URI); on a
cluster of several machines a local OUT must be a filesystem every node mounts.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import WriteResult

from lejepa_platform.console import say
from lejepa_platform.data.reader import Plan, Unit, load_unit, plan_source
from lejepa_platform.data.ray_units import join_ray, read_units
from lejepa_platform.data.shards.convert import Conversion, check_label, convert_record, write_shard
from lejepa_platform.data.shards.tally import Written, shard_entry
from lejepa_platform.data.sources import SHARD_COLUMNS, RawRecord
from lejepa_platform.errors import UserError

ERROR = "ERROR "
"""How a read task marks a record whose label is not allowed (followed by the message)."""


def write_on_ray(source: str, names: Sequence[str], conversion: Conversion, rows_per_shard: int, split_seed: int, *,
                 address: str, filesystem: pafs.FileSystem, directory: str, quiet: bool) -> Written:
    """Read, convert and write every record of `source` as shards under `directory` on the Ray
    cluster at `address`; what was written, counted for the manifest."""
    plan = plan_source(source, "all")
    join_ray(address)
    say(quiet, f"shards: {plan.rows} records in {len(plan.units)} units, converted and written by Ray Data tasks")
    read = functools.partial(converted_unit, conversion=conversion, names=tuple(names))
    dataset = read_units(plan, read)
    dataset.context.execution_options.preserve_order = True
    sink = ShardSink(filesystem, directory, rows_per_shard, split_seed)
    dataset.write_datasink(sink)
    written = Written(split_seed)
    for result in sink.results:
        if result["errors"]:
            raise UserError(result["errors"][0])
        written.add_counted(result["entry"], result["skipped"], result["records"])
    say(quiet, f"shards: wrote {len(written.shards)} shards ({written.total_rows()} rows)")
    return written


def converted_unit(unit: Unit, plan: Plan, *, conversion: Conversion, names: tuple[str, ...]) -> Iterator[pa.Table]:
    """A unit's records as shard rows: the converted bytes (empty when skipped), label, id, and why
    the record was skipped ("" when kept; ERROR and the message for a label outside the class
    names, which the driver raises once the tasks are done, so that it stays one line)."""
    for images, labels, ids in load_unit(unit, plan):
        converted, reasons = [], []
        for payload, label, record_id in zip(images, labels, ids):
            record = RawRecord(record_id, int(label), payload)
            result = convert_record(record, conversion)
            if not isinstance(result, str):
                try:
                    check_label(record, names)
                except UserError as err:
                    result = ERROR + str(err)
            converted.append(b"" if isinstance(result, str) else result)
            reasons.append(result if isinstance(result, str) else "")
        yield pa.table({"image": pa.array(converted, pa.binary()), "label": pa.array(labels, pa.int64()),
                        "id": pa.array(ids, pa.string()), "skip": pa.array(reasons, pa.string())})


class ShardSink(Datasink):
    """Writes each write task's kept records as one shard; `results` holds, per task, its shard entry
    (None when nothing was kept), skip counts, records seen and label errors."""

    def __init__(self, filesystem: pafs.FileSystem, directory: str, rows_per_shard: int, split_seed: int) -> None:
        self.filesystem, self.directory = filesystem, directory
        self.rows_per_shard, self.split_seed = rows_per_shard, split_seed
        self.results: list[dict] = []

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_shard

    def write(self, blocks: Iterable[Block], ctx) -> dict:
        table = pa.concat_tables([BlockAccessor.for_block(block).to_arrow() for block in blocks])
        reasons = [reason for reason in table.column("skip").to_pylist() if reason]
        errors = [r[len(ERROR):] for r in reasons if r.startswith(ERROR)]
        result = {"entry": None, "records": table.num_rows, "errors": errors,
                  "skipped": Counter(r for r in reasons if not r.startswith(ERROR))}
        kept = table.filter(pc.equal(table.column("skip"), "")).select(list(SHARD_COLUMNS))
        if kept.num_rows and not result["errors"]:
            name = f"part-{ctx.task_idx:05d}.parquet"
            write_shard(kept, f"{self.directory}/{name}", self.filesystem)
            result["entry"] = shard_entry(name, kept, self.split_seed)
        return result

    def on_write_complete(self, write_result: WriteResult) -> None:
        self.results = list(write_result.write_returns)
