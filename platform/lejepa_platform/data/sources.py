"""Every image source the platform reads, behind one record iterator.

A source yields records (stable id, integer label or -1, encoded bytes or a pixel array) in a
deterministic order, so a rebuild gives the same ids, the same shards and the same content hash.
Kinds: an image folder (one subfolder per class, or flat and unlabelled), MNIST-style idx files
(plain or gzipped), .npy/.npz arrays, WebDataset tars (one tar or a folder of them), Parquet shards
(a shard directory, or `builtin:NAME` for the ones shipped in the package).

Shards may also live behind a URI that pyarrow opens (s3://, gs://, hdfs://, file://): they are read
through a (filesystem, path) pair, the local filesystem's for local paths, so both take one code path.
The other kinds are inputs to a build and stay local.

Class names come from the subfolders, a shard manifest, or a `classes.txt` (one name per line)
next to an idx / array / tar source; otherwise labels are named by their number.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lejepa_platform.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
LABEL_EXTENSIONS = ("cls", "cls.txt", "label", "label.txt")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
MANIFEST = "manifest.json"
SHARD_COLUMNS = ("image", "label", "id")
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
LOCAL_FS = pafs.LocalFileSystem()
FOOTER_THREADS = 16
"""Parquet footers read at once when opening shards (each is a round trip on object storage)."""


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


def is_tar_name(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES) and not name.startswith(".")


def _is_idx_name(name: str) -> bool:
    low = name.lower()
    return "idx" in low and (low.endswith("-ubyte") or low.endswith("-ubyte.gz"))


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
        return _classes_txt(self.path.parent if self.path.is_file() else self.path)

    def fingerprint(self) -> str:
        """Changes whenever the records could change (paths and sizes of the files read)."""
        digest = hashlib.sha256(self.kind.encode())
        for file in self._files():
            digest.update(f"{file.name}\t{file.stat().st_size}\n".encode())
        return digest.hexdigest()

    def records(self, skip: int = 0) -> Iterator[RawRecord]:
        raise NotImplementedError

    def _files(self) -> list[Path]:
        return [self.path]

    def describe(self) -> dict:
        """What the manifest records about the source: kind and name only (no machine paths)."""
        return {"kind": self.kind, "name": self.name}


def _classes_txt(folder: Path | str, filesystem: pafs.FileSystem = LOCAL_FS) -> list[str]:
    path = f"{folder}/classes.txt"
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return []
    with filesystem.open_input_stream(path) as handle:
        text = handle.read().decode()
    return [line.strip() for line in text.splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# Image folders


class FolderSource(Source):
    """A folder of image files: one subfolder per class, or flat (unlabelled, searched recursively)."""

    kind = "folder"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        direct = [p for p in path.iterdir() if p.is_file() and is_image_name(p.name)]
        subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        self._classes: list[str] = []
        entries: list[tuple[str, int]] = []
        if not direct:
            for sub in subdirs:
                files = _walk_images(sub, path)
                if files:
                    entries.extend((rel, len(self._classes)) for rel in files)
                    self._classes.append(sub.name)
        if direct or not entries:
            self._classes = []
            entries = [(rel, -1) for rel in _walk_images(path, path)]
        if not entries:
            raise UserError(f"no image files in {str(path)!r} (looked for {', '.join(IMAGE_EXTENSIONS)}; "
                            f"a folder may also hold .tar, idx or .parquet files)")
        self.entries = entries

    def class_names(self) -> list[str]:
        return list(self._classes)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.kind.encode())
        for rel, label in self.entries:
            digest.update(f"{rel}\t{label}\t{(self.path / rel).stat().st_size}\n".encode())
        return digest.hexdigest()

    def records(self, skip: int = 0) -> Iterator[RawRecord]:
        for rel, label in self.entries[skip:]:
            yield RawRecord(rel, label, (self.path / rel).read_bytes())


def _walk_images(folder: Path, root: Path) -> list[str]:
    """Image files under `folder`, as sorted posix paths relative to `root` (hidden entries skipped)."""
    found = []
    for current, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_dir = Path(current).relative_to(root)
        found.extend((rel_dir / f).as_posix() for f in files if is_image_name(f))
    return sorted(found)


# --------------------------------------------------------------------------------------------
# MNIST-style idx files


class IdxSource(Source):
    """An idx3 images file (plain or .gz) with its idx1 labels file found by name when present."""

    kind = "idx"

    def __init__(self, path: Path) -> None:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if _is_idx_name(p.name) and "idx3" in p.name)
            if len(found) != 1:
                raise UserError(f"{str(path)!r} holds {len(found)} idx3 image files; pass one of them as the source")
            path = found[0]
        super().__init__(path)
        label_path = path.with_name(path.name.replace("images-idx3", "labels-idx1"))
        self.label_path = label_path if label_path != path and label_path.is_file() else None

    def _files(self) -> list[Path]:
        return [self.path] + ([self.label_path] if self.label_path else [])

    def _arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        images = _read_idx(self.path)
        if images.ndim not in (3, 4):
            raise UserError(f"{str(self.path)!r} is an idx file of {images.ndim} dimensions; images need 3 (N, H, W) or 4")
        labels = _read_idx(self.label_path) if self.label_path else None
        if labels is not None and labels.shape != (images.shape[0],):
            raise UserError(f"{str(self.label_path)!r} holds {labels.shape} labels for {images.shape[0]} images")
        return images, labels

    def records(self, skip: int = 0) -> Iterator[RawRecord]:
        images, labels = self._arrays()
        base = self.path.name[:-3] if self.path.name.endswith(".gz") else self.path.name
        for i in range(skip, images.shape[0]):
            yield RawRecord(f"{base}/{i:06d}", int(labels[i]) if labels is not None else -1, images[i])


_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as err:
        raise UserError(f"cannot read idx file {str(path)!r}: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise UserError(f"{str(path)!r} is not an idx file (bad magic number)")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    start = 4 + 4 * ndim
    count = int(np.prod(shape))
    if len(raw) - start < count * dtype.itemsize:
        raise UserError(f"{str(path)!r} is truncated: header says {shape}, file is too short")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=start).reshape(shape)


# --------------------------------------------------------------------------------------------
# .npy / .npz arrays


class ArraySource(Source):
    """uint8 images (N, H, W), (N, H, W, C) or (N, C, H, W); .npz: `images` or `x`, optional `labels` or `y`."""

    kind = "array"

    def _arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        try:
            loaded = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read array file {str(self.path)!r}: {err}") from None
        if isinstance(loaded, np.ndarray):
            images, labels = loaded, None
        else:
            keys = list(loaded.keys())
            image_key = next((k for k in ("images", "x") if k in keys), None)
            if image_key is None:
                raise UserError(f"{str(self.path)!r} has arrays {keys}; expected images under 'images' or 'x'")
            label_key = next((k for k in ("labels", "y") if k in keys), None)
            images = loaded[image_key]
            labels = np.asarray(loaded[label_key]) if label_key else None
        if images.dtype != np.uint8:
            raise UserError(f"{str(self.path)!r}: images must be uint8 (0-255), got {images.dtype}")
        if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[3] not in (1, 3, 4):
            images = images.transpose(0, 2, 3, 1)
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3, 4)):
            raise UserError(f"{str(self.path)!r}: images of shape {images.shape} are not (N, H, W[, C])")
        if labels is not None and (labels.shape != (images.shape[0],) or labels.dtype.kind not in "iu"):
            raise UserError(f"{str(self.path)!r}: labels must be integers of shape ({images.shape[0]},), got "
                            f"{labels.dtype} {labels.shape}")
        return images, labels

    def records(self, skip: int = 0) -> Iterator[RawRecord]:
        images, labels = self._arrays()
        for i in range(skip, images.shape[0]):
            yield RawRecord(f"{self.path.name}/{i:06d}", int(labels[i]) if labels is not None else -1,
                            np.asarray(images[i]))


# --------------------------------------------------------------------------------------------
# WebDataset tars


class TarSource(Source):
    """WebDataset: samples are consecutive members sharing a key; one image member each, label in .cls."""

    kind = "webdataset"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.tars = sorted(p for p in path.iterdir() if p.is_file() and is_tar_name(p.name)) if path.is_dir() else [path]
        if not self.tars:
            raise UserError(f"no .tar files in {str(path)!r}")

    def _files(self) -> list[Path]:
        return list(self.tars)

    def records(self, skip: int = 0) -> Iterator[RawRecord]:
        seen = 0
        for tar in self.tars:
            for record in iter_tar(tar):
                if seen >= skip:
                    yield record
                seen += 1


def iter_tar(path: Path) -> Iterator[RawRecord]:
    """Samples of one WebDataset tar in stored order; samples without an image member are dropped."""
    stem = path.name
    for suffix in TAR_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    key, image, label = None, None, -1
    try:
        with tarfile.open(path, "r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")
                if base.startswith("."):
                    continue
                sample, _, ext = base.partition(".")
                sample_key = f"{directory}/{sample}" if directory else sample
                if sample_key != key:
                    if key is not None and image is not None:
                        yield RawRecord(f"{stem}/{key}", label, image)
                    key, image, label = sample_key, None, -1
                ext = ext.lower()
                if image is None and ("." + ext.rsplit(".", 1)[-1]) in IMAGE_EXTENSIONS:
                    image = archive.extractfile(member).read()
                elif ext in LABEL_EXTENSIONS:
                    text = archive.extractfile(member).read().decode("utf-8", "replace").strip()
                    label = _parse_label(text, path, member.name)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise UserError(f"cannot read tar {str(path)!r}: {err}") from None
    if key is not None and image is not None:
        yield RawRecord(f"{stem}/{key}", label, image)


def _parse_label(text: str, path: Path, member: str) -> int:
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        raise UserError(f"{str(path)!r}: label member {member!r} must hold an integer, got {text[:40]!r}") from None


# --------------------------------------------------------------------------------------------
# Parquet shards


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
        elif self.is_dir:
            self.files = sorted(info.path for info in self.filesystem.get_file_info(pafs.FileSelector(root))
                                if info.base_name.endswith(".parquet") and not info.base_name.startswith("."))
        else:
            self.files = [root]
        if not self.files:
            hint = "; only Parquet shards are read from a URI (see `lejepa shards build`)" if is_uri(source) else ""
            raise UserError(f"no .parquet files in {self.where!r}{hint}")
        with ThreadPoolExecutor(max_workers=min(FOOTER_THREADS, len(self.files))) as pool:
            self.footers = list(pool.map(self._footer, self.files))

    def _footer(self, file: str) -> pq.FileMetaData:
        """The file's Parquet metadata; UserError unless it has image (binary), label (integer), id (string)."""
        try:
            metadata = pq.ParquetFile(file, filesystem=self.filesystem).metadata
        except (OSError, pa.ArrowException) as err:
            raise UserError(f"{self._name_of(file)!r} is not a readable Parquet file: {err}") from None
        check_shard_columns(metadata.schema.to_arrow_schema(), self._name_of(file))
        return metadata

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
        return _classes_txt(self.path if self.is_dir else self.path.parent, self.filesystem)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.kind.encode())
        for info in self.filesystem.get_file_info(self.files):
            digest.update(f"{info.base_name}\t{info.size}\n".encode())
        return digest.hexdigest()

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


# --------------------------------------------------------------------------------------------


def open_source(source: str) -> Source:
    """Recognise what `source` is; UserError naming what is supported when it is none of them."""
    if is_uri(source):
        return ShardSource(source)
    path = resolve_source(source)
    if path.is_dir():
        names = [p.name for p in path.iterdir()]
        if MANIFEST in names or any(n.endswith(".parquet") for n in names):
            return ShardSource(path)
        if any(is_tar_name(n) for n in names) and not any(is_image_name(n) for n in names):
            return TarSource(path)
        if any(_is_idx_name(n) for n in names) and not any(is_image_name(n) for n in names):
            return IdxSource(path)
        return FolderSource(path)
    name = path.name.lower()
    if is_tar_name(name):
        return TarSource(path)
    if _is_idx_name(name):
        return IdxSource(path)
    if name.endswith((".npy", ".npz")):
        return ArraySource(path)
    if name.endswith(".parquet"):
        return ShardSource(path)
    raise UserError(f"unsupported source file {str(path)!r}: expected an image folder, idx file (*-ubyte[.gz]), "
                    f".npy/.npz, WebDataset .tar, Parquet shards or builtin:NAME")
