"""Every image source the platform reads, one module per kind behind one factory (`open_source`).

A source yields records (stable id, integer label or -1, encoded bytes or a pixel array) in a
deterministic order, so a rebuild gives the same ids, the same shards and the same content hash.
Kinds: an image folder (folder.py), MNIST-style idx files (idx.py), .npy/.npz arrays (arrays.py),
WebDataset tars (tar.py), Parquet shards (parquet.py; also `builtin:NAME` for the ones shipped in
the package), Hub-layout Parquet (hub.py) and CSV / JSONL lists of image paths (pathlist.py).

Parquet (shards or Hub layout) may also live behind a URI that pyarrow opens; the other kinds are
inputs to a build and stay local (a path list may name URIs). Class names come from the
subfolders, a shard manifest, the Hub metadata, a list's class-name labels, or a `classes.txt`
(one name per line) next to the source; otherwise labels are named by their number.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lejepa_platform.data.sources.arrays import ArraySource
from lejepa_platform.data.sources.base import (BUILTIN_DIR, IMAGE_EXTENSIONS, LOCAL_FS, MANIFEST, SHARD_COLUMNS,
                                               RawRecord, Source, is_image_name, is_uri, locate, parquet_files,
                                               resolve_source)
from lejepa_platform.data.sources.folder import FolderSource
from lejepa_platform.data.sources.hub import HubParquetSource, is_hub_schema
from lejepa_platform.data.sources.idx import IdxSource, is_idx_name
from lejepa_platform.data.sources.parquet import ShardSource, check_shard_columns, read_manifest
from lejepa_platform.data.sources.pathlist import PathListSource, is_list_name, read_entry
from lejepa_platform.data.sources.tar import TarSource, is_tar_name, iter_tar, tar_index
from lejepa_platform.errors import UserError

__all__ = ["BUILTIN_DIR", "IMAGE_EXTENSIONS", "LOCAL_FS", "MANIFEST", "SHARD_COLUMNS", "ArraySource", "FolderSource",
           "HubParquetSource", "IdxSource", "PathListSource", "RawRecord", "ShardSource", "Source", "TarSource",
           "check_shard_columns", "is_image_name", "is_tar_name", "is_uri", "iter_tar", "locate", "open_source",
           "read_entry", "read_manifest", "resolve_source", "tar_index"]


def open_source(source: str) -> Source:
    """Recognise what `source` is; UserError naming what is supported when it is none of them."""
    if is_uri(source):
        return _parquet(source)
    path = resolve_source(source)
    if path.is_dir():
        names = [p.name for p in path.iterdir()]
        if MANIFEST in names or parquet_files(LOCAL_FS, str(path)):  # also a Hub dataset repository's root
            return _parquet(path)
        if any(is_tar_name(n) for n in names) and not any(is_image_name(n) for n in names):
            return TarSource(path)
        if any(is_idx_name(n) for n in names) and not any(is_image_name(n) for n in names):
            return IdxSource(path)
        return FolderSource(path)
    name = path.name.lower()
    if is_tar_name(name):
        return TarSource(path)
    if is_idx_name(name):
        return IdxSource(path)
    if name.endswith((".npy", ".npz")):
        return ArraySource(path)
    if name.endswith(".parquet"):
        return _parquet(path)
    if is_list_name(name):
        return PathListSource(path)
    raise UserError(f"unsupported source file {str(path)!r}: expected an image folder, idx file (*-ubyte[.gz]), "
                    f".npy/.npz, WebDataset .tar, Parquet (shards or Hugging Face Hub layout), a .csv / .jsonl "
                    f"list of image paths, or builtin:NAME")


def _parquet(source: str | Path) -> Source:
    """Shards (a manifest, or image as bytes) or the Hub layout (image as struct<bytes, path>)."""
    filesystem, root = locate(source)
    if filesystem.get_file_info(f"{root}/{MANIFEST}").type == pafs.FileType.File:
        return ShardSource(source)
    files = parquet_files(filesystem, root)
    try:
        schema = pq.read_schema(files[0], filesystem=filesystem) if files else None
    except (OSError, pa.ArrowException):
        schema = None  # ShardSource names the unreadable file
    if schema is not None and is_hub_schema(schema):
        return HubParquetSource(source)
    return ShardSource(source)
