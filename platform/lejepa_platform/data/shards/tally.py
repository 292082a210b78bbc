"""What a build wrote, counted into the manifest's numbers: one implementation for both builds.

Each build (single-process or on Ray Data) adds its shards to a `Written` as they are finished;
`manifest_counts` then checks that something readable was written and counts rows, classes and
skipped records, and `split_spec` (split.py) draws the split from the labels and split keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from lejepa_platform.data.decode import count_reasons
from lejepa_platform.data.shards.convert import digest_table
from lejepa_platform.data.shards.split import split_key
from lejepa_platform.errors import UserError


@dataclasses.dataclass
class Written:
    """Shards written so far: manifest entries, labels and split keys per shard, records read and skipped."""

    split_seed: int
    shards: list[dict] = dataclasses.field(default_factory=list)
    labels: list[np.ndarray] = dataclasses.field(default_factory=list)
    keys: list[np.ndarray] = dataclasses.field(default_factory=list)
    skipped: Counter = dataclasses.field(default_factory=Counter)
    records: int = 0

    def add(self, name: str, table: pa.Table, skipped: Counter | dict, records: int) -> None:
        """A finished shard `name` holding `table`, made from `records` records of which `skipped` were not kept."""
        self.add_counted(shard_entry(name, table, self.split_seed), skipped, records)

    def add_counted(self, entry: dict, skipped: Counter | dict, records: int) -> None:
        """A shard counted where it was written (`shard_entry`), or only skipped records (entry None)."""
        if entry is not None:
            self.shards.append({k: entry[k] for k in ("file", "rows", "sha256")})
            self.labels.append(np.asarray(entry["labels"], dtype=np.int64))
            self.keys.append(np.asarray(entry["keys"], dtype=np.int64))
        self.skipped.update(skipped)
        self.records += records

    def total_rows(self) -> int:
        return sum(s["rows"] for s in self.shards)


def shard_entry(name: str, table: pa.Table, split_seed: int) -> dict:
    """What the manifest and the split need from one shard: file, rows, digest, labels, split keys."""
    ids = table.column("id").to_pylist()
    return {"file": name, "rows": table.num_rows, "sha256": digest_table(table),
            "labels": table.column("label").to_numpy(), "keys": [split_key(split_seed, i) for i in ids]}


def manifest_counts(written: Written, names: Sequence[str], source_name: str) -> tuple[dict, np.ndarray, np.ndarray]:
    """(the manifest's counting part, every row's label, every row's split key); UserError when no
    record was readable."""
    labels = np.concatenate(written.labels) if written.labels else np.zeros(0, np.int64)
    keys = np.concatenate(written.keys) if written.keys else np.zeros(0, np.int64)
    if len(labels) == 0:
        reasons = count_reasons([written.skipped])
        raise UserError(f"no readable images in {source_name!r} ({written.records} records, skipped: "
                        + ", ".join(f"{k} {v}" for k, v in reasons.items()) + ")")
    names = list(names)
    if not names and (labels >= 0).any():
        names = [str(i) for i in range(int(labels.max()) + 1)]
    counts = np.bincount(labels[labels >= 0], minlength=len(names)) if names else np.zeros(0, np.int64)
    shards = sorted(written.shards, key=lambda s: s["file"])
    counted = {"rows": int(len(labels)), "shards": shards, "classes": names,
               "class_counts": [int(c) for c in counts], "unlabelled": int((labels < 0).sum()),
               "skipped": count_reasons([written.skipped]),
               "content_hash": hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()}
    return counted, labels, keys
