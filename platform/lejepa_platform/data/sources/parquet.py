"""Parquet shards (columns image bytes, label int, id string): a shard directory, one file, or
builtin:NAME, local or behind a URI; plus the manifest a finished build writes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lejepa_platform.data.sources.base import (MANIFEST, SHARD_COLUMNS, RawRecord, Source, classes_txt, files_fingerprint,
                                               filesystem_sizes, is_uri, locate, parquet_files, read_footers)
from lejepa_platform.errors import UserError


class ShardSource(Source):
    """Parquet files with columns image (bytes), label (int), id (string): a shard dir or one file,
    local or behind a URI. `files` are paths inside `filesystem`; `footers` their Parquet metadata."""

    kind = "shards"

    def __init__(self, source: str | Path) -> None:
        self.filesystem, root = locate(source)
        super().__init__(Path(root))
        self.where = str(source)
        self.is_dir = self.filesystem.get_file_info(root).type == pafs.FileType.Directory
        manifest_type = self.filesystem.get_file_info(f"{root}/{MANIFEST}").type if self.is_dir else None
        has_manifest = manifest_type == pafs.FileType.File
        self.manifest = read_manifest(root, self.filesystem, where=self.where) if has_manifest else None
        if self.manifest is not None:
            self.files = [f"{root}/{entry['file']}" for entry in self.manifest["shards"]]
        else:
            self.files = parquet_files(self.filesystem, root)
        if not self.files:
            hint = "; only Parquet shards are read from a URI (see `lejepa shards build`)" if is_uri(source) else ""
            raise UserError(f"no .parquet files in {self.where!r}{hint}")
        self.footers = read_footers(self.filesystem, self.files,
                                    lambda file, meta: check_shard_columns(meta.schema.to_arrow_schema(), file),
                                    name=self._name_of)

    def _name_of(self, file: str) -> str:
        """How messages name a file: as the user would (the URI for remote shards)."""
        if not is_uri(self.where):
            return file
        return f"{self.where.rstrip('/')}/{file.rsplit('/', 1)[-1]}" if self.is_dir else self.where

    @property
    def name(self) -> str:
        if self.manifest and self.manifest.get("name"):
            return str(self.manifest["name"])
        return self.path.name

    def class_names(self) -> list[str]:
        if self.manifest is not None:
            return list(self.manifest.get("classes", []))
        return classes_txt(self.path if self.is_dir else self.path.parent, self.filesystem)

    def fingerprint(self) -> str:
        return files_fingerprint(self.kind, filesystem_sizes(self.filesystem, self.files))

    def records(self, skip: int = 0) -> Iterator[RawRecord]:
        seen = 0
        for file in self.files:
            handle = pq.ParquetFile(file, filesystem=self.filesystem)
            for group in range(handle.num_row_groups):
                rows = handle.metadata.row_group(group).num_rows
                if seen + rows <= skip:
                    seen += rows
                    continue
                table = handle.read_row_group(group, columns=list(SHARD_COLUMNS))
                ids = table.column("id").to_pylist()
                labels = table.column("label").to_numpy(zero_copy_only=False)
                images = table.column("image").to_pylist()
                for i in range(max(0, skip - seen), rows):
                    yield RawRecord(ids[i], int(labels[i]), images[i])
                seen += rows


def check_shard_columns(schema: pa.Schema, file: str) -> None:
    """UserError unless the Parquet file `file` has image (binary), label (integer) and id (string)."""
    expected = {"image": pa.types.is_binary, "label": pa.types.is_integer, "id": pa.types.is_string}
    wrong = [name for name, ok in expected.items()
             if name not in schema.names or not (ok(schema.field(name).type)
                                                 or (name == "image" and pa.types.is_large_binary(schema.field(name).type))
                                                 or (name == "id" and pa.types.is_large_string(schema.field(name).type)))]
    if wrong:
        raise UserError(f"{file!r} lacks the expected column(s) {', '.join(wrong)}: shards need image (bytes), "
                        f"label (integer, -1 when unlabelled) and id (string); has {', '.join(schema.names)}")


def read_manifest(directory: str | Path, filesystem: pafs.FileSystem | None = None, *, where: str = "") -> dict:
    """The manifest of a finished shard build; UserError when missing or unreadable.

    directory: a local path, builtin:NAME or URI; or a path inside `filesystem` (`where` then names it
    in messages).
    """
    where = where or str(directory)
    if filesystem is None:
        filesystem, directory = locate(directory)
    path = f"{directory}/{MANIFEST}"
    shown = f"{where.rstrip('/')}/{MANIFEST}"
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        raise UserError(f"{where!r} has no {MANIFEST}: not a finished shard build "
                        f"(an interrupted `lejepa shards build` resumes when re-run)")
    try:
        with filesystem.open_input_stream(path) as handle:
            manifest = json.loads(handle.read())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {shown!r}: {err}") from None
    if not isinstance(manifest, dict) or "shards" not in manifest or "rows" not in manifest:
        raise UserError(f"{shown!r} is not a shard manifest (no 'shards' / 'rows')")
    return manifest
