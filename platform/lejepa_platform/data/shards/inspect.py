"""Inspect a shard directory: rows, classes, shards, split, and every image decoded."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lejepa_platform.data.decode import BadImage, count_reasons, load_image
from lejepa_platform.data.sources import (MANIFEST, SHARD_COLUMNS, ShardSource, is_uri, locate)
from lejepa_platform.errors import UserError

from lejepa_platform.data.shards.build import MAX_PIXELS
from lejepa_platform.data.shards.convert import digest_table


def _check_record(data: bytes) -> str | None:
    try:
        load_image(data, MAX_PIXELS)
    except BadImage as err:
        return err.reason
    return None


def inspect_shards(path: str) -> dict:
    """Rows, class counts, shards, split and unreadable records (every image is decoded)."""
    filesystem, root = locate(path)
    is_dir = filesystem.get_file_info(root).type == pafs.FileType.Directory
    names = [info.base_name for info in filesystem.get_file_info(pafs.FileSelector(root))] if is_dir else []
    if not (root.endswith(".parquet") or MANIFEST in names or any(n.endswith(".parquet") for n in names)):
        raise UserError(f"{path!r} is not a shard directory (no {MANIFEST} or .parquet files)")
    source = ShardSource(path)
    manifest = source.manifest
    names = source.class_names()
    counts: Counter = Counter()
    bad: Counter = Counter()
    examples: list[str] = []
    shards = []
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for file, info in zip(source.files, source.filesystem.get_file_info(source.files)):
            table = pq.read_table(file, columns=list(SHARD_COLUMNS), filesystem=source.filesystem)
            ids = table.column("id").to_pylist()
            counts.update(table.column("label").to_pylist())
            for record_id, reason in zip(ids, pool.map(_check_record, table.column("image").to_pylist())):
                if reason:
                    bad[reason] += 1
                    if len(examples) < 5:
                        examples.append(record_id)
            shards.append({"file": info.base_name, "rows": table.num_rows, "bytes": info.size,
                           "sha256": digest_table(table)})
    labels = sorted(k for k in counts if k >= 0)
    classes = [{"label": k, "name": names[k] if k < len(names) else str(k), "count": counts[k]} for k in labels]
    result = {"path": path if is_uri(path) else root, "rows": sum(s["rows"] for s in shards), "classes": classes,
              "unlabelled": counts.get(-1, 0), "shards": shards,
              "unreadable": {"total": sum(bad.values()), **count_reasons([bad]), "examples": examples},
              "manifest": manifest is not None}
    if manifest is not None:
        content = hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()
        result["split"] = (manifest.get("split") or {}).get("rows")
        result["content_hash"] = content
        result["content_hash_matches_manifest"] = content == manifest.get("content_hash")
    return result

