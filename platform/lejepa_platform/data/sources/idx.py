"""MNIST-style idx files (plain or gzipped): an idx3 images file and its idx1 labels file."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lejepa_platform.data.sources.base import RawRecord, Source
from lejepa_platform.errors import UserError


def is_idx_name(name: str) -> bool:
    low = name.lower()
    return "idx" in low and (low.endswith("-ubyte") or low.endswith("-ubyte.gz"))


class IdxSource(Source):
    """An idx3 images file (plain or .gz) with its idx1 labels file found by name when present."""

    kind = "idx"

    def __init__(self, path: Path) -> None:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if is_idx_name(p.name) and "idx3" in p.name)
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
