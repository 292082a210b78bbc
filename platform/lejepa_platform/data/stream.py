"""The training stream without Ray: which records a rank sees, in which order, where it stands, and
the views of one block of a work item (the pipeline's Ray Data operators and the benchmark's
DataLoader both call `block_records` then `records_views`).

The order of an epoch is a pure function of (seed, epoch): the plan's units are permuted, cut into
shuffle windows of consecutive units, and the rows of each window are permuted. The windows of all
epochs, one epoch after another, form the run's sequence of work items; item i goes to rank
i % world. A rank's position is the next item it has not finished and how many rows of that item's
order it has consumed, so a restart continues from the exact row without reading the rows before it
(decoding nothing it will not use), whatever the number of restarts.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from lejepa_platform.config import DataConfig
from lejepa_platform.data.decode import decode_batch
from lejepa_platform.data.reader import UNIT_ROWS, Plan, Unit, block_rows, load_unit
from lejepa_platform.data.views import decode_side, multi_crop, record_seed

@dataclasses.dataclass(frozen=True)
class StreamPosition:
    """Where a rank's stream stands: rows [0, row) of work item `item` are consumed (and every item before it)."""

    item: int = 0
    row: int = 0

    def after(self, item: int, row: int) -> StreamPosition:
        """The position after consuming the row at (item, row)."""
        return StreamPosition(int(item), int(row) + 1)


def window_units(cfg: DataConfig) -> int:
    """Consecutive units read together and shuffled as one window (data.shuffle_buffer rows, rounded up)."""
    return max(1, math.ceil(cfg.shuffle_buffer / UNIT_ROWS))


def windows_per_epoch(plan: Plan, cfg: DataConfig) -> int:
    return math.ceil(len(plan.units) / window_units(cfg))


def epoch_units(plan: Plan, seed: int, epoch: int) -> list[Unit]:
    """The units in this epoch's order (a permutation seeded by (seed, epoch))."""
    order = np.random.default_rng([seed % 2**64, epoch % 2**64, 0x5EED]).permutation(len(plan.units))
    return [plan.units[i] for i in order]


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One shuffle window of one epoch, turned into views block by block in `row_order`."""

    index: int
    """Position in the run's global item sequence (epoch-major)."""
    epoch: int
    window: int
    units: tuple[Unit, ...]

    def row_order(self, rows: int, seed: int) -> np.ndarray:
        """The window's rows (as loaded, units concatenated) in this epoch's order."""
        return np.random.default_rng([seed % 2**64, self.epoch % 2**64, self.window, 0x0DE5]).permutation(rows)


def work_item(plan: Plan, cfg: DataConfig, seed: int, index: int) -> WorkItem:
    """Item `index` of the run's sequence: epoch index // windows, that epoch's window index % windows."""
    per_epoch = windows_per_epoch(plan, cfg)
    epoch, window = divmod(index, per_epoch)
    size = window_units(cfg)
    units = epoch_units(plan, seed, epoch)[window * size:(window + 1) * size]
    return WorkItem(index, epoch, window, tuple(units))


def rank_items(plan: Plan, cfg: DataConfig, *, epochs: int, rank: int, world: int, first: int = 0) -> list[int]:
    """Global indices of the items rank `rank` of `world` reads in epochs [0, epochs), from item `first` on."""
    total = epochs * windows_per_epoch(plan, cfg)
    return [i for i in range(rank, total, world) if i >= first]


def record_uid(record_id: str) -> int:
    """A record id as a non-negative int64 (travels with every training row: tests and logs count ids)."""
    return record_seed(record_id) & (2**63 - 1)


@dataclasses.dataclass(frozen=True)
class LoadedItem:
    """A work item's encoded records as loaded (units concatenated) and their order in the epoch."""

    item: WorkItem
    images: list
    labels: np.ndarray
    ids: list[str]
    order: np.ndarray


def load_item(plan: Plan, cfg: DataConfig, seed: int, index: int) -> LoadedItem:
    """Read the records of work item `index` (no decoding: that happens per block)."""
    item = work_item(plan, cfg, seed, index)
    images: list = []
    labels: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    ids: list[str] = []
    for unit in item.units:
        for unit_images, unit_labels, unit_ids in load_unit(unit, plan):
            images.extend(unit_images)
            labels.append(unit_labels)
            ids.extend(unit_ids)
    return LoadedItem(item, images, np.concatenate(labels), ids, item.row_order(len(ids), seed))


def block_records(loaded: LoadedItem, start: int, rows: int) -> dict[str, Any]:
    """Rows [start, start + rows) of the item's order, still encoded: image (bytes), label, id, and
    where each row sits (item, row) and its epoch (the views' randomness follows it)."""
    pick = loaded.order[start:start + rows]
    return {"image": [loaded.images[i] for i in pick], "label": loaded.labels[pick],
            "id": [loaded.ids[i] for i in pick], "item": np.full(len(pick), loaded.item.index, dtype=np.int64),
            "row": np.arange(start, start + len(pick), dtype=np.int64),
            "epoch": np.full(len(pick), loaded.item.epoch, dtype=np.int64)}


def records_views(records: Mapping[str, Any], cfg: DataConfig, *, seed: int,
                  photometric: bool = True) -> tuple[dict[str, np.ndarray] | None, Counter, int]:
    """Views of one block of `block_records` (all rows of one work item): (batch, or None when every
    record was bad; skip reasons; records read).

    Batch columns: global uint8 (b, G, 3, Hg, Hg), local uint8 (b, L, 3, Hl, Hl) when L > 0, label
    int64, uid int64 (`record_uid`), item and row int64 (the position, see `StreamPosition`); with
    photometric=False the views are geometric crops only and global_params / local_params float32
    carry each view's photometric random numbers for the trainer to apply.
    """
    images = list(records["image"])
    arrays, kept, bad = decode_batch(images, cfg.max_image_pixels, decode_side(cfg))
    if not kept:
        return None, bad, len(images)
    ids = [records["id"][i] for i in kept]
    batch = multi_crop(arrays, ids, cfg, seed=seed, epoch=int(records["epoch"][0]), photometric=photometric)
    if not cfg.local_views:
        batch.pop("local", None)
        batch.pop("local_params", None)
    batch.update(label=np.asarray(records["label"], dtype=np.int64)[kept],
                 uid=np.array([record_uid(i) for i in ids], dtype=np.int64),
                 item=np.asarray(records["item"], dtype=np.int64)[kept],
                 row=np.asarray(records["row"], dtype=np.int64)[kept])
    return batch, bad, len(images)


def item_blocks(plan: Plan, cfg: DataConfig, *, seed: int, index: int, skip: int = 0, photometric: bool = True,
                rows_per_block: int | None = None) -> Iterator[tuple[dict[str, np.ndarray] | None, Counter, int]]:
    """`records_views` of work item `index` one block after another, from row `skip` of its order on
    (rows before it are never decoded); blocks of `rows_per_block` records (default `reader.block_rows`)."""
    loaded = load_item(plan, cfg, seed, index)
    rows = rows_per_block or block_rows(cfg)
    for start in range(skip, len(loaded.ids), rows):
        yield records_views(block_records(loaded, start, rows), cfg, seed=seed, photometric=photometric)
