"""Units of work over a source, and what one unit becomes (no Ray here).

A plan cuts a readable source (shard directory, image folder, WebDataset tars) into units of a few
hundred records: consecutive Parquet row groups (local or behind a URI: the plan carries the
filesystem they are read through), a slice of the folder listing, or one tar. A unit
turns into blocks of views (training) or centre crops (evaluation), with bad records skipped and
counted. The same functions run inside Ray Data tasks, in the DataLoader workers of the benchmark's
baseline and in-process for small evaluation sets, so the three cannot drift apart.

Split rule: a shard manifest with a fixed split serves train, test or all. A source without one
serves all of its rows; `train` falls back to all of them with a warning, and `test` is an error
(there is nothing held out to test on).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lejepa_platform.config import DataConfig
from lejepa_platform.data.decode import decode_batch
from lejepa_platform.data.shards import split_mask
from lejepa_platform.data.sources import (LOCAL_FS, SHARD_COLUMNS, FolderSource, ShardSource, TarSource, iter_tar,
                                          open_source)
from lejepa_platform.data.views import center_views, decode_side, multi_crop, record_seed
from lejepa_platform.errors import UserError

log = logging.getLogger("lejepa_platform.data")

UNIT_ROWS = 512
"""Records per unit of work (a Ray Data task processes one unit at a time)."""
BLOCK_BYTES = 16 * 2**20
"""Target size of one output block of views."""


@dataclasses.dataclass(frozen=True)
class Unit:
    """A slice of a source small enough for one task: row groups of a Parquet file, files of a folder, a tar."""

    kind: str
    path: str
    row_groups: tuple[int, ...] = ()
    files: tuple[str, ...] = ()
    labels: tuple[int, ...] = ()

    @property
    def key(self) -> str:
        """Names the unit independently of where the data lives (seeds its row shuffle)."""
        return f"{Path(self.path).name}:{self.row_groups[:1]}:{self.files[:1]}"


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


def plan_source(source: str, split: str) -> Plan:
    """Cut `source` into units and resolve `split` (train, test or all) against its manifest."""
    if split not in ("train", "test", "all"):
        raise UserError(f"split {split!r} is not allowed: must be one of train, test, all")
    src = open_source(source)
    spec, filesystem = None, LOCAL_FS
    if isinstance(src, ShardSource):
        spec = src.manifest.get("split") if src.manifest else None
        filesystem = src.filesystem
        units, total = [], 0
        for file, meta in zip(src.files, src.footers):
            group: list[int] = []
            rows = 0
            for index in range(meta.num_row_groups):
                group.append(index)
                rows += meta.row_group(index).num_rows
                if rows >= UNIT_ROWS or index == meta.num_row_groups - 1:
                    units.append(Unit("parquet", file, row_groups=tuple(group)))
                    total += rows
                    group, rows = [], 0
    elif isinstance(src, FolderSource):
        entries = src.entries
        units = [Unit("files", str(src.path), files=tuple(e[0] for e in entries[i:i + UNIT_ROWS]),
                      labels=tuple(e[1] for e in entries[i:i + UNIT_ROWS])) for i in range(0, len(entries), UNIT_ROWS)]
        total = len(entries)
    elif isinstance(src, TarSource):
        units = [Unit("tar", str(tar)) for tar in src.tars]
        total = sum(1 for _ in src.records())
    else:
        raise UserError(f"{source!r} is a {src.kind} source, which the pipeline reads through shards: "
                        f"run `lejepa shards build {source} OUT` and use OUT")
    if spec is None and split == "test":
        raise UserError(f"{source!r} has no fixed train/test split, so there is no test split; use split=all "
                        f"or build shards with a test fraction")
    if spec is None and split == "train":
        log.warning("%s has no fixed train/test split: split 'train' reads all %d rows", source, total)
        split = "all"
    rows = total if split == "all" else int(spec["rows"][split])
    if rows == 0:
        raise UserError(f"{source!r} has no rows in split {split!r}")
    return Plan(source, tuple(units), split, spec, rows, tuple(src.class_names()), filesystem)


def epoch_units(plan: Plan, seed: int, epoch: int) -> list[Unit]:
    """The units in this epoch's order (a permutation seeded by (seed, epoch))."""
    order = np.random.default_rng([seed % 2**64, epoch % 2**64, 0x5EED]).permutation(len(plan.units))
    return [plan.units[i] for i in order]


def load_unit(unit: Unit, plan: Plan) -> Iterator[tuple[list, np.ndarray, list[str]]]:
    """(encoded images, labels, ids) of the unit's rows in the plan's split, in chunks of <= UNIT_ROWS."""
    if unit.kind == "parquet":
        handle = pq.ParquetFile(unit.path, filesystem=plan.filesystem)
        table = handle.read_row_groups(list(unit.row_groups), columns=list(SHARD_COLUMNS))
        chunks = [(table.column("image").to_pylist(), table.column("label").to_numpy().astype(np.int64),
                   table.column("id").to_pylist())]
    elif unit.kind == "files":
        root = Path(unit.path)
        chunks = [([_read_bytes(root / rel) for rel in unit.files], np.array(unit.labels, dtype=np.int64),
                   list(unit.files))]
    else:
        chunks = _tar_chunks(Path(unit.path))
    for images, labels, ids in chunks:
        if plan.split != "all":
            keep = np.flatnonzero(split_mask(ids, labels, plan.split_spec, plan.split))
            images, labels, ids = [images[i] for i in keep], labels[keep], [ids[i] for i in keep]
        if ids:
            yield images, labels, ids


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
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


def train_blocks(unit: Unit, plan: Plan, cfg: DataConfig, *, seed: int,
                 epoch: int) -> Iterator[tuple[dict[str, np.ndarray] | None, Counter, int]]:
    """Blocks of views of one unit: (batch or None when every record was bad, skip reasons, records read).

    Rows are shuffled within the unit (seeded by seed, epoch, unit); batch columns: global uint8
    (b, G, 3, Hg, Hg), local uint8 (b, L, 3, Hl, Hl) when L > 0, label int64 (b,).
    """
    rows, side = block_rows(cfg), decode_side(cfg)
    for images, labels, ids in load_unit(unit, plan):
        order = np.random.default_rng([seed % 2**64, epoch % 2**64, record_seed(unit.key)]).permutation(len(ids))
        for start in range(0, len(order), rows):
            pick = order[start:start + rows]
            arrays, kept, bad = decode_batch([images[i] for i in pick], cfg.max_image_pixels, side)
            if not kept:
                yield None, bad, len(pick)
                continue
            chosen = pick[kept]
            views = multi_crop(arrays, [ids[i] for i in chosen], cfg, seed=seed, epoch=epoch)
            batch = {"global": views["global"], "label": labels[chosen]}
            if cfg.local_views:
                batch["local"] = views["local"]
            yield batch, bad, len(pick)


def eval_blocks(unit: Unit, plan: Plan, size: int,
                max_pixels: int) -> Iterator[tuple[dict[str, np.ndarray] | None, Counter, int]]:
    """Centre-crop evaluation views of one unit in stored order: image uint8 (b, 3, S, S), label int64."""
    for images, labels, _ in load_unit(unit, plan):
        for start in range(0, len(labels), UNIT_ROWS):
            part = images[start:start + UNIT_ROWS]
            arrays, kept, bad = decode_batch(part, max_pixels, size)
            batch = {"image": center_views(arrays, size), "label": labels[start:start + UNIT_ROWS][kept]}
            yield (batch if kept else None), bad, len(part)


def describe(counts: Counter) -> str:
    """'read 200 records, skipped 11 (undecodable 5, truncated 5, too_large 1)'."""
    skipped = {k: v for k, v in sorted(counts.items()) if k != "records" and v}
    total = sum(skipped.values())
    detail = f" ({', '.join(f'{k} {v}' for k, v in skipped.items())})" if total else ""
    return f"read {counts.get('records', 0)} records, skipped {total}{detail}"
