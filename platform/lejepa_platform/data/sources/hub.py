"""Parquet in the Hugging Face Hub image layout: an `image` struct column of `bytes` and `path`,
an optional integer `label`, and class names in the file's `huggingface` schema metadata.

Read through pyarrow alone (local or behind a URI). Row counts come from the Parquet footers, so
planning reads no image. A record's id is `FILE_STEM/ROW` (its row in its file): the Hub layout has
no id column, and `path` is often a bare file name repeated across splits. An image stored by
`path` only (no bytes) is read relative to the Parquet file's folder. A folder holding both
train-*.parquet and test-*.parquet files has that fixed split (`file_splits`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lejepa_platform.data.sources.base import (RawRecord, Source, files_fingerprint, filesystem_sizes, is_uri, locate,
                                               parquet_files, read_footers)
from lejepa_platform.errors import UserError

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
SPLIT_PREFIXES = ("train", "test")


def is_hub_image_type(kind: pa.DataType) -> bool:
    """A struct with a binary `bytes` field: how the Hub's `datasets` library stores an Image feature."""
    if not pa.types.is_struct(kind):
        return False
    names = [kind.field(i).name for i in range(kind.num_fields)]
    return "bytes" in names and (pa.types.is_binary(kind.field("bytes").type)
                                 or pa.types.is_large_binary(kind.field("bytes").type))


def is_hub_schema(schema: pa.Schema) -> bool:
    return IMAGE_COLUMN in schema.names and is_hub_image_type(schema.field(IMAGE_COLUMN).type)


def hub_class_names(schema: pa.Schema) -> list[str]:
    """The label's ClassLabel names from the `huggingface` schema metadata; [] when absent."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        info = json.loads(raw) if raw else {}
        names = info.get("info", {}).get("features", {}).get(LABEL_COLUMN, {}).get("names", [])
    except (ValueError, AttributeError):
        return []
    return [str(n) for n in names] if isinstance(names, list) else []


class HubParquetSource(Source):
    """One Hub-layout Parquet file or a folder of them; `files` are paths inside `filesystem`."""

    kind = "hub-parquet"

    def __init__(self, source: str | Path) -> None:
        self.filesystem, root = locate(source)
        super().__init__(Path(root))
        self.where = str(source)
        self.files = parquet_files(self.filesystem, root)
        if not self.files:
            raise UserError(f"no .parquet files in {self.where!r}")
        self.footers = read_footers(self.filesystem, self.files, _check_hub_footer)
        self.schema = self.footers[0].schema.to_arrow_schema()
        self.has_labels = LABEL_COLUMN in self.schema.names

    def class_names(self) -> list[str]:
        return hub_class_names(self.schema)

    def file_splits(self) -> dict[str, list[str]] | None:
        """{"train": files, "test": files} when file names say it (train-*.parquet, test-*.parquet, as
        the Hub names them), else None; files of other splits (validation) are only in "all"."""
        groups = {split: [f for f in self.files if f.rsplit("/", 1)[-1].startswith(split)] for split in SPLIT_PREFIXES}
        return groups if all(groups.values()) else None

    def fingerprint(self) -> str:
        return files_fingerprint(self.kind, filesystem_sizes(self.filesystem, self.files))

    def records(self, skip: int = 0) -> Iterator[RawRecord]:
        seen = 0
        for file, meta in zip(self.files, self.footers):
            start = 0
            for group in range(meta.num_row_groups):
                rows = meta.row_group(group).num_rows
                if seen + rows > skip:
                    images, labels, ids = read_hub_rows(self.filesystem, file, (group,), start)
                    for i in range(max(0, skip - seen), rows):
                        yield RawRecord(ids[i], int(labels[i]), images[i])
                seen += rows
                start += rows


def _check_hub_footer(file: str, metadata: pq.FileMetaData) -> None:
    schema = metadata.schema.to_arrow_schema()
    if not is_hub_schema(schema):
        raise UserError(f"{file!r} has no {IMAGE_COLUMN!r} column of struct<bytes, path>, as the other "
                        f"Hub-layout files here have; has {', '.join(schema.names)}")
    if LABEL_COLUMN in schema.names and not pa.types.is_integer(schema.field(LABEL_COLUMN).type):
        raise UserError(f"{file!r}: column {LABEL_COLUMN!r} must hold integers, got {schema.field(LABEL_COLUMN).type}")


def read_hub_rows(filesystem: pafs.FileSystem, file: str, row_groups: tuple[int, ...],
                  start: int) -> tuple[list[bytes], np.ndarray, list[str]]:
    """(encoded images, labels with -1 for none, ids) of consecutive row groups whose first row is
    row `start` of the file."""
    handle = pq.ParquetFile(file, filesystem=filesystem)
    has_labels = LABEL_COLUMN in handle.schema_arrow.names
    table = handle.read_row_groups(list(row_groups), columns=[IMAGE_COLUMN] + ([LABEL_COLUMN] if has_labels else []))
    column = table.column(IMAGE_COLUMN).combine_chunks()
    data = column.field("bytes").to_pylist()
    paths = column.field("path").to_pylist() if "path" in [f.name for f in column.type] else [None] * len(data)
    folder = file.rsplit("/", 1)[0] if "/" in file else "."
    images = [d if d is not None else _read_path(filesystem, folder, p) for d, p in zip(data, paths)]
    if has_labels:
        labels = table.column(LABEL_COLUMN).fill_null(-1).to_numpy().astype(np.int64)
    else:
        labels = np.full(len(images), -1, dtype=np.int64)
    stem = file.rsplit("/", 1)[-1].removesuffix(".parquet")
    return images, labels, [f"{stem}/{start + i:06d}" for i in range(len(images))]


def _read_path(filesystem: pafs.FileSystem, folder: str, path: str | None) -> bytes:
    """An image the row names by path only; b"" (an undecodable record) when it cannot be read."""
    if not path:
        return b""
    try:
        if is_uri(path):
            filesystem, path = locate(path)
        elif not path.startswith("/"):
            path = f"{folder}/{path}"
        with filesystem.open_input_stream(path) as handle:
            return handle.read()
    except (OSError, pa.ArrowException, UserError):
        return b""
