"""What every source kind shares: the record type, the base class, and where a source lives.

Shards may live behind a URI that pyarrow opens (s3://, gs://, hdfs://, file://): they are read
through a (filesystem, path) pair, the local filesystem's for local paths, so both take one code path.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lejepa_platform.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
MANIFEST = "manifest.json"
SHARD_COLUMNS = ("image", "label", "id")
BUILTIN_DIR = Path(__file__).resolve().parents[1] / "builtin"
LOCAL_FS = pafs.LocalFileSystem()


@dataclass(frozen=True)
class RawRecord:
    """One image as the source holds it: encoded bytes, or a uint8 pixel array."""

    id: str
    label: int
    payload: bytes | np.ndarray


def resolve_source(source: str) -> Path:
    """`builtin:NAME` -> the packaged shard directory; anything else -> the path, which must exist."""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        path = BUILTIN_DIR / name
        if not name or not (path / MANIFEST).is_file():
            known = sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / MANIFEST).is_file()) if BUILTIN_DIR.is_dir() else []
            raise UserError(f"unknown built-in dataset {source!r}; available: "
                            + (", ".join(f"builtin:{k}" for k in known) or "none"))
        return path
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"source {source!r} does not exist")
    return path


def is_uri(source: str | Path) -> bool:
    """`scheme://...` (s3, gs, hdfs, file, ...): read through the pyarrow filesystem for that scheme."""
    return isinstance(source, str) and "://" in source


def locate(source: str | Path, *, must_exist: bool = True) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it): a URI through pyarrow, a local path or builtin:NAME on the local
    filesystem. UserError when a source given as a string does not exist (unless `must_exist` is
    False, for a URI about to be written) or cannot be reached."""
    if not is_uri(source):
        return LOCAL_FS, str(resolve_source(source) if isinstance(source, str) else source)
    try:
        filesystem, path = _from_uri(source)
        missing = must_exist and filesystem.get_file_info(path).type == pafs.FileType.NotFound
    except (pa.ArrowException, OSError, ValueError) as err:
        raise UserError(f"cannot open {source!r}: {err}") from None
    if missing:
        raise UserError(f"source {source!r} does not exist")
    return filesystem, path.rstrip("/") or "/"


_from_uri = pafs.FileSystem.from_uri
"""Every URI goes through this one call (tests map a bucket onto a local folder here)."""


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


class Source:
    """Base of every kind: a deterministic record stream plus what the manifest needs to know."""

    kind = "source"

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def name(self) -> str:
        return self.path.name

    def class_names(self) -> list[str]:
        """Names indexed by label; [] when unknown (labels are then named by number)."""
        return classes_txt(self.path.parent if self.path.is_file() else self.path)

    def fingerprint(self) -> str:
        """Changes whenever the records could change (paths and sizes of the files read)."""
        return files_fingerprint(self.kind, [(file.name, file.stat().st_size) for file in self._files()])

    def records(self, skip: int = 0) -> Iterator[RawRecord]:
        raise NotImplementedError

    def _files(self) -> list[Path]:
        return [self.path]

    def describe(self) -> dict:
        """What the manifest records about the source: kind and name only (no machine paths)."""
        return {"kind": self.kind, "name": self.name}


def files_fingerprint(kind: str, files: list[tuple[str, int]]) -> str:
    """A digest of a source's kind and its files' (name, size) pairs."""
    digest = hashlib.sha256(kind.encode())
    for name, size in files:
        digest.update(f"{name}\t{size}\n".encode())
    return digest.hexdigest()


def filesystem_sizes(filesystem: pafs.FileSystem, files: list[str]) -> list[tuple[str, int]]:
    """(name, size) of files behind a pyarrow filesystem."""
    return [(info.base_name, info.size) for info in filesystem.get_file_info(files)]


def classes_txt(folder: Path | str, filesystem: pafs.FileSystem = LOCAL_FS) -> list[str]:
    """Class names from a `classes.txt` (one name per line) in `folder`; [] when there is none."""
    path = f"{folder}/classes.txt"
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return []
    with filesystem.open_input_stream(path) as handle:
        text = handle.read().decode()
    return [line.strip() for line in text.splitlines() if line.strip()]


FOOTER_THREADS = 16
"""Parquet footers read at once when opening a source (each is a round trip on object storage)."""


def _visible_parquet(infos: list[pafs.FileInfo]) -> list[str]:
    return sorted(info.path for info in infos if info.type == pafs.FileType.File
                  and info.base_name.endswith(".parquet") and not info.base_name.startswith("."))


def parquet_files(filesystem: pafs.FileSystem, root: str) -> list[str]:
    """The .parquet files of `root`: [root] for a file; a directory's own (sorted, hidden ones
    skipped); else, for a dataset repository as the Hugging Face Hub stores it (a README beside
    data/ or one config folder), the files of its one subfolder that holds Parquet files."""
    if filesystem.get_file_info(root).type != pafs.FileType.Directory:
        return [root]
    entries = filesystem.get_file_info(pafs.FileSelector(root))
    own = _visible_parquet(entries)
    if own:
        return own
    holders = {info.base_name: files for info in entries
               if info.type == pafs.FileType.Directory and not info.base_name.startswith(".")
               for files in [_visible_parquet(filesystem.get_file_info(pafs.FileSelector(info.path)))] if files}
    if len(holders) > 1:
        raise UserError(f"{root!r} holds Parquet files in several folders ({', '.join(sorted(holders))}): "
                        f"give the one to read as the source, e.g. {root.rstrip('/')}/{min(holders)}")
    return next(iter(holders.values()), [])


def read_footers(filesystem: pafs.FileSystem, files: list[str], check: Callable[[str, pq.FileMetaData], None], *,
                 name: Callable[[str], str] = str) -> list[pq.FileMetaData]:
    """Each file's Parquet footer, FOOTER_THREADS at a time, passed to `check(name(file), metadata)`
    (which raises UserError for a file of the wrong layout); UserError naming a file that is not
    Parquet. `name` says how messages name a file (as the user gave it)."""
    def footer(file: str) -> pq.FileMetaData:
        try:
            metadata = pq.ParquetFile(file, filesystem=filesystem).metadata
        except (OSError, pa.ArrowException) as err:
            raise UserError(f"{name(file)!r} is not a readable Parquet file: {err}") from None
        check(name(file), metadata)
        return metadata

    with ThreadPoolExecutor(max_workers=max(1, min(FOOTER_THREADS, len(files)))) as pool:
        return list(pool.map(footer, files))
