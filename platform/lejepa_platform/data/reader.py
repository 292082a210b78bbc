"""Units of work over a source, and what one unit becomes (no Ray here).

A plan cuts a readable source (shards or Hub-layout Parquet, an image folder or path list, WebDataset
tars) into units of a few hundred records: consecutive Parquet row groups (local or behind a URI:
the plan carries the filesystem they are read through), a slice of the listing, or one tar. Row
counts come from Parquet footers, listings and stored tar indexes, never from reading images.
`load_unit` reads a unit's records; data/stream.py turns them into training views, `eval_blocks`
into centre crops, with bad records skipped and counted. The same functions run inside the
pipeline's Ray tasks, in the DataLoader workers of the benchmark's baseline and in-process for small
evaluation sets, so the three cannot drift apart.

Split rule: a shard manifest with a fixed split (or a Hub-layout folder of train-* and test-*
files) serves train, test or all. A source without one serves all of its rows; `train` falls back
to all of them with a warning, and `test` is an error (there is nothing held out to test on).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lejepa_platform.config import DataConfig
from lejepa_platform.data.decode import decode_batch
from lejepa_platform.data.shards import split_mask
from lejepa_platform.data.sources import (LOCAL_FS, SHARD_COLUMNS, FolderSource, HubParquetSource, PathListSource,
                                          ShardSource, TarSource, iter_tar, open_source, read_entry)
from lejepa_platform.data.sources.hub import read_hub_rows
from lejepa_platform.data.views import center_views
from lejepa_platform.errors import UserError

log = logging.getLogger("lejepa_platform.data")

UNIT_ROWS = 512
"""Records per unit of work (the smallest slice of a source a plan cuts)."""
BLOCK_BYTES = 16 * 2**20
"""Target size of one output block of views."""


@dataclasses.dataclass(frozen=True)
class Unit:
    """A slice of a source small enough for one task: row groups of a Parquet file (kind "parquet" for
    shards, "hub" for the Hub layout), files of a folder or a path list ("files"), a tar ("tar")."""

    kind: str
    path: str
    row_groups: tuple[int, ...] = ()
    files: tuple[str, ...] = ()
    labels: tuple[int, ...] = ()
    start: int = 0
    """Row of the file the unit's first row group starts at (names the rows of Hub-layout files)."""
    rows: int = 0
    """Records the unit holds, before any split filter (from footers, the listing or the tar index)."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a pipeline reads: its units, the split they are filtered to, and how many rows that is."""

    source: str
    units: tuple[Unit, ...]
    split: str
    split_spec: dict | None
    rows: int
    class_names: tuple[str, ...]
    filesystem: pafs.FileSystem
    """Where the units' Parquet files are read from (picklable: Ray tasks receive it with the plan)."""
    labelled: int | None = None
    """Labelled rows of the whole source when known without reading images (manifest, listing, tar
    index, a Hub file without a label column); None when only reading the labels would tell."""


def plan_source(source: str, split: str) -> Plan:
    """Cut `source` into units and resolve `split` (train, test or all) against its manifest."""
    return with_split(plan_whole(source), split)


def plan_whole(source: str) -> Plan:
    """All of `source` cut into units (split "all"), with what `with_split` needs to derive its
    train and test plans without opening the source again."""
    src = open_source(source)
    if isinstance(src, (ShardSource, HubParquetSource)):
        units, total, spec, labelled = _plan_parquet(src)
        filesystem = src.filesystem
    elif isinstance(src, (FolderSource, PathListSource)):
        units, total, spec, labelled = _plan_listing(src)
        filesystem = LOCAL_FS
    elif isinstance(src, TarSource):
        indexes = src.indexes()
        units = [Unit("tar", str(tar), rows=index.rows) for tar, index in zip(src.tars, indexes) if index.rows]
        total, spec, labelled = sum(i.rows for i in indexes), None, sum(i.labelled for i in indexes)
        filesystem = LOCAL_FS
    else:
        raise UserError(f"{source!r} is a {src.kind} source, which the pipeline reads through shards: "
                        f"run `lejepa shards build {source} OUT` and use OUT")
    if total == 0:
        raise UserError(f"{source!r} has no rows in split 'all'")
    return Plan(source, tuple(units), "all", spec, total, tuple(src.class_names()), filesystem, labelled)


def with_split(plan: Plan, split: str) -> Plan:
    """The plan of `split` (train, test or all) of the source `plan` covers whole, derived from the
    whole plan alone (no reading)."""
    if split not in ("train", "test", "all"):
        raise UserError(f"split {split!r} is not allowed: must be one of train, test, all")
    if plan.split != "all":
        raise ValueError(f"with_split derives from a plan of the whole source, got split {plan.split!r}")
    spec = plan.split_spec
    if spec is None and split == "test":
        raise UserError(f"{plan.source!r} has no fixed train/test split, so there is no test split; use split=all "
                        f"or build shards with a test fraction")
    if spec is None and split == "train":
        log.warning("%s has no fixed train/test split: split 'train' reads all %d rows", plan.source, plan.rows)
    if spec is None or split == "all":
        return plan
    units = plan.units if spec["method"] != "files" else tuple(u for u in plan.units if u.path in spec["files"][split])
    rows = int(spec["rows"][split])
    if rows == 0:
        raise UserError(f"{plan.source!r} has no rows in split {split!r}")
    return dataclasses.replace(plan, units=units, split=split, rows=rows)


def _plan_parquet(src: ShardSource | HubParquetSource) -> tuple[list[Unit], int, dict | None, int | None]:
    """Units, rows, split spec and labelled rows of shards or Hub-layout Parquet (from the footers)."""
    units = _parquet_units("parquet" if isinstance(src, ShardSource) else "hub", src.files, src.footers)
    total = sum(meta.num_rows for meta in src.footers)
    if isinstance(src, ShardSource):
        if not src.manifest:
            return units, total, None, None
        labelled = int(src.manifest["rows"]) - int(src.manifest.get("unlabelled", 0))
        return units, total, src.manifest.get("split"), labelled
    groups = src.file_splits()
    spec = None
    if groups is not None:  # the split is the files: a split's plan keeps the units of its files
        rows = {name: sum(meta.num_rows for file, meta in zip(src.files, src.footers) if file in files)
                for name, files in groups.items()}
        spec = {"method": "files", "rows": rows, "files": groups}
    return units, total, spec, None if src.has_labels else 0


def _plan_listing(src: FolderSource | PathListSource) -> tuple[list[Unit], int, None, int]:
    """Units of UNIT_ROWS files of an image folder or a path list, in listing order."""
    entries = src.entries
    root = src.path if isinstance(src, FolderSource) else src.path.parent
    units = [Unit("files", str(root), files=tuple(e[0] for e in entries[i:i + UNIT_ROWS]),
                  labels=tuple(e[1] for e in entries[i:i + UNIT_ROWS]), rows=len(entries[i:i + UNIT_ROWS]))
             for i in range(0, len(entries), UNIT_ROWS)]
    return units, len(entries), None, sum(1 for _, label in entries if label >= 0)


def _parquet_units(kind: str, files: list[str], footers: list) -> list[Unit]:
    """Consecutive row groups of each file, about UNIT_ROWS rows per unit (counts from the footers)."""
    units = []
    for file, meta in zip(files, footers):
        group: list[int] = []
        rows = first = 0
        for index in range(meta.num_row_groups):
            group.append(index)
            rows += meta.row_group(index).num_rows
            if rows >= UNIT_ROWS or index == meta.num_row_groups - 1:
                units.append(Unit(kind, file, row_groups=tuple(group), start=first, rows=rows))
                first += rows
                group, rows = [], 0
    return units


def load_unit(unit: Unit, plan: Plan) -> Iterator[tuple[list, np.ndarray, list[str]]]:
    """(encoded images, labels, ids) of the unit's rows in the plan's split, in chunks of <= UNIT_ROWS."""
    if unit.kind == "parquet":
        handle = pq.ParquetFile(unit.path, filesystem=plan.filesystem)
        table = handle.read_row_groups(list(unit.row_groups), columns=list(SHARD_COLUMNS))
        chunks = [(table.column("image").to_pylist(), table.column("label").to_numpy().astype(np.int64),
                   table.column("id").to_pylist())]
    elif unit.kind == "hub":
        chunks = [read_hub_rows(plan.filesystem, unit.path, unit.row_groups, unit.start)]
    elif unit.kind == "files":
        root = Path(unit.path)
        chunks = [([_read_bytes(root, ref) for ref in unit.files], np.array(unit.labels, dtype=np.int64),
                   list(unit.files))]
    else:
        chunks = _tar_chunks(Path(unit.path))
    for images, labels, ids in chunks:
        if _filters_rows(plan):
            keep = np.flatnonzero(split_mask(ids, labels, plan.split_spec, plan.split))
            images, labels, ids = [images[i] for i in keep], labels[keep], [ids[i] for i in keep]
        if ids:
            yield images, labels, ids


def unit_rows(unit: Unit, plan: Plan) -> int:
    """Records `load_unit` yields for the unit, without reading images (only a split of shards reads
    the ids and labels it is decided by)."""
    if not _filters_rows(plan):
        return unit.rows
    handle = pq.ParquetFile(unit.path, filesystem=plan.filesystem)
    table = handle.read_row_groups(list(unit.row_groups), columns=["id", "label"])
    return int(split_mask(table.column("id").to_pylist(), table.column("label").to_numpy(), plan.split_spec,
                          plan.split).sum())


def _filters_rows(plan: Plan) -> bool:
    """Whether the plan's split keeps part of each unit's rows (a shard manifest's split by id)."""
    return plan.split != "all" and plan.split_spec.get("method") != "files"


def _read_bytes(root: Path, ref: str) -> bytes:
    try:
        return read_entry(root, ref)
    except (OSError, pa.ArrowException, UserError):
        return b""  # counted as undecodable: a file that vanished is one bad record, not a failed task


def _tar_chunks(path: Path) -> Iterator[tuple[list, np.ndarray, list[str]]]:
    images, labels, ids = [], [], []
    for record in iter_tar(path):
        images.append(record.payload)
        labels.append(record.label)
        ids.append(record.id)
        if len(ids) == UNIT_ROWS:
            yield images, np.array(labels, dtype=np.int64), ids
            images, labels, ids = [], [], []
    if ids:
        yield images, np.array(labels, dtype=np.int64), ids


def view_bytes(cfg: DataConfig) -> int:
    """Bytes of uint8 views one training row becomes."""
    return 3 * (cfg.global_views * cfg.global_size ** 2 + cfg.local_views * cfg.local_size ** 2)


def block_rows(cfg: DataConfig) -> int:
    """Rows per output block so that a block of views is about BLOCK_BYTES."""
    return int(np.clip(BLOCK_BYTES // view_bytes(cfg), 8, UNIT_ROWS))


def eval_blocks(unit: Unit, plan: Plan, size: int,
                max_pixels: int) -> Iterator[tuple[dict[str, np.ndarray] | None, Counter, int]]:
    """Centre-crop evaluation views of one unit in stored order: image uint8 (b, 3, S, S), label int64."""
    for images, labels, _ in load_unit(unit, plan):
        for start in range(0, len(labels), UNIT_ROWS):
            part = images[start:start + UNIT_ROWS]
            views, kept, bad = eval_views(part, size, max_pixels)
            batch = {"image": views, "label": labels[start:start + UNIT_ROWS][kept]}
            yield (batch if kept else None), bad, len(part)


def eval_views(images: list, size: int, max_pixels: int) -> tuple[np.ndarray, list[int], Counter]:
    """The evaluation view of encoded images: (uint8 (k, 3, S, S) centre crops, indices of the k
    decoded images, skip reasons of the others)."""
    arrays, kept, bad = decode_batch(images, max_pixels, size)
    return center_views(arrays, size), kept, bad


def describe(counts: Counter) -> str:
    """'read 200 records, skipped 11 (undecodable 5, truncated 5, too_large 1)'."""
    skipped = {k: v for k, v in sorted(counts.items()) if k != "records" and v}
    total = sum(skipped.values())
    detail = f" ({', '.join(f'{k} {v}' for k, v in skipped.items())})" if total else ""
    return f"read {counts.get('records', 0)} records, skipped {total}{detail}"
