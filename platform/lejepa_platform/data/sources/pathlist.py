"""A CSV or JSONL list of image paths or URIs, with optional labels.

CSV: a header row naming the columns; JSONL: one object per line with the same keys. The image is
in the first column named one of PATH_COLUMNS (a path relative to the list's folder, an absolute
path, or a URI pyarrow opens); `label` (optional) holds an integer (-1 or empty: unlabelled) or a
class name. Integer labels take their names from a `classes.txt` next to the list; class names
are sorted and numbered, as the subfolders of an image folder are. A record's id is the path as the
list writes it. Local files are checked when the list is opened, so a list naming a missing file
fails before anything is read or written.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from lejepa_platform.data.sources.base import RawRecord, Source, classes_txt, is_uri, locate
from lejepa_platform.errors import UserError

LIST_SUFFIXES = (".csv", ".jsonl")
PATH_COLUMNS = ("path", "file_name", "filename", "file", "image", "uri", "url")
LABEL_COLUMN = "label"


def is_list_name(name: str) -> bool:
    return name.lower().endswith(LIST_SUFFIXES) and not name.startswith(".")


def read_entry(root: Path, ref: str) -> bytes:
    """The bytes of one listed image: `ref` is a URI, an absolute path or a path relative to `root`."""
    if is_uri(ref):
        filesystem, path = locate(ref)
        with filesystem.open_input_stream(path) as handle:
            return handle.read()
    return (root / ref).read_bytes()


class PathListSource(Source):
    """Records in list order; `entries` are (path as written, label or -1)."""

    kind = "pathlist"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        rows = _read_rows(path)
        if not rows:
            raise UserError(f"{str(path)!r} lists no images")
        columns = list(rows[0][1])
        path_column = next((c for c in PATH_COLUMNS if c in columns), None)
        if path_column is None:
            raise UserError(f"{str(path)!r} has columns {columns}; the image path must be in a column named one "
                            f"of {', '.join(PATH_COLUMNS)} (and an optional {LABEL_COLUMN!r})")
        refs = []
        for line, row in rows:
            ref = str(row.get(path_column) or "").strip()
            if not ref:
                raise UserError(f"{str(path)!r} line {line}: empty {path_column!r}")
            if not is_uri(ref) and not (path.parent / ref).is_file():
                raise UserError(f"{str(path)!r} line {line}: {ref!r} does not exist"
                                + ("" if Path(ref).is_absolute() else f" (relative to {str(path.parent)!r})"))
            refs.append(ref)
        raw = [row.get(LABEL_COLUMN) for _, row in rows]
        self._classes, labels = _labels(raw, path, [line for line, _ in rows])
        self.entries = list(zip(refs, labels))

    def class_names(self) -> list[str]:
        return list(self._classes) if self._classes else classes_txt(self.path.parent)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.kind.encode())
        digest.update(self.path.read_bytes())
        for ref, _ in self.entries:
            size = "" if is_uri(ref) else (self.path.parent / ref).stat().st_size
            digest.update(f"{ref}\t{size}\n".encode())
        return digest.hexdigest()

    def records(self, skip: int = 0) -> Iterator[RawRecord]:
        for ref, label in self.entries[skip:]:
            try:
                data = read_entry(self.path.parent, ref)
            except (OSError, pa.ArrowException) as err:
                raise UserError(f"cannot read {ref!r} listed in {str(self.path)!r}: {err}") from None
            yield RawRecord(ref, label, data)


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of every data row; UserError when the list cannot be parsed."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {str(path)!r}: {err}") from None
    if path.name.lower().endswith(".csv"):
        reader = csv.DictReader(text.splitlines())
        return [(reader.line_num, row) for row in reader if any((v or "").strip() for v in row.values())]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{str(path)!r} line {number} is not JSON: {err.msg}") from None
        if not isinstance(row, dict):
            raise UserError(f"{str(path)!r} line {number} must be a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    return rows


def _labels(raw: list, path: Path, lines: list[int]) -> tuple[list[str], list[int]]:
    """(class names or [] for integer labels, label per row): names are sorted and numbered."""
    given = [None if value is None or str(value).strip() == "" else str(value).strip() for value in raw]
    present = [v for v in given if v is not None]
    if all(_is_int(v) for v in present):
        labels = [int(v) if v is not None else -1 for v in given]
        for line, label in zip(lines, labels):
            if label < -1:
                raise UserError(f"{str(path)!r} line {line}: label {label} is not allowed (-1 or >= 0)")
        return [], labels
    names = sorted(set(present))
    number = {name: i for i, name in enumerate(names)}
    return names, [number[v] if v is not None else -1 for v in given]


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True
