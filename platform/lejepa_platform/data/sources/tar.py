"""WebDataset tars: samples are consecutive members sharing a key, one image member each, the label
in a .cls member; one tar or a folder of them.

Planning needs each tar's row count. It comes from one indexing pass over the member headers (no
image is read; an uncompressed tar is skipped through by seeking), stored in a small index file in
the user's cache keyed by the tar's path, size and modification time, so a tar is indexed once.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lejepa_platform.data.sources.base import IMAGE_EXTENSIONS, RawRecord, Source
from lejepa_platform.errors import UserError

LABEL_EXTENSIONS = ("cls", "cls.txt", "label", "label.txt")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
INDEX_VERSION = 1


def is_tar_name(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES) and not name.startswith(".")


@dataclass(frozen=True)
class TarIndex:
    """What planning needs to know about one tar without reading its images."""

    rows: int
    labelled: int


class TarSource(Source):
    """One WebDataset tar or a folder of them (read in name order)."""

    kind = "webdataset"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.tars = sorted(p for p in path.iterdir() if p.is_file() and is_tar_name(p.name)) if path.is_dir() else [path]
        if not self.tars:
            raise UserError(f"no .tar files in {str(path)!r}")

    def _files(self) -> list[Path]:
        return list(self.tars)

    def indexes(self) -> list[TarIndex]:
        """Each tar's row and label counts (from its stored index; indexed now when it has none)."""
        return [tar_index(tar) for tar in self.tars]

    def records(self, skip: int = 0) -> Iterator[RawRecord]:
        seen = 0
        for tar, index in zip(self.tars, self.indexes() if skip else [None] * len(self.tars)):
            if index is not None and seen + index.rows <= skip:
                seen += index.rows  # a resumed build skips whole tars without opening them
                continue
            for record in iter_tar(tar):
                if seen >= skip:
                    yield record
                seen += 1


def iter_tar(path: Path) -> Iterator[RawRecord]:
    """Samples of one WebDataset tar in stored order; samples without an image member are dropped."""
    stem = _stem(path)
    for key, label, image in _samples(path, "r|*", images=True):
        yield RawRecord(f"{stem}/{key}", label, image)


def tar_index(path: Path) -> TarIndex:
    """Row and label counts of one tar: from its stored index, else one header pass (then stored)."""
    stat = path.stat()
    cache = _index_dir() / (hashlib.sha256(f"{path.resolve()}\t{stat.st_size}\t{stat.st_mtime_ns}".encode())
                            .hexdigest()[:32] + ".json")
    try:
        stored = json.loads(cache.read_text())
        if stored.get("version") == INDEX_VERSION:
            return TarIndex(int(stored["rows"]), int(stored["labelled"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    rows = labelled = 0
    for _, label, _ in _samples(path, "r:*", images=False):
        rows += 1
        labelled += label >= 0
    index = TarIndex(rows, labelled)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": INDEX_VERSION, "tar": path.name, "rows": rows, "labelled": labelled}))
        os.replace(tmp, cache)
    except OSError:
        pass  # an unwritable cache costs a re-index next time, nothing else
    return index


def _index_dir() -> Path:
    """Where tar indexes are stored: $XDG_CACHE_HOME (default ~/.cache) / lejepa_platform / tar-index."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "lejepa_platform" / "tar-index"


def _stem(path: Path) -> str:
    for suffix in TAR_SUFFIXES:
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


def _samples(path: Path, mode: str, *, images: bool) -> Iterator[tuple[str, int, bytes | None]]:
    """(sample key, label or -1, image bytes or None unless `images`) of the samples with an image member."""
    key, has_image, image, label = None, False, None, -1
    try:
        with tarfile.open(path, mode) as archive:
            for member in archive:
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")
                if base.startswith("."):
                    continue
                sample, _, ext = base.partition(".")
                sample_key = f"{directory}/{sample}" if directory else sample
                if sample_key != key:
                    if key is not None and has_image:
                        yield key, label, image
                    key, has_image, image, label = sample_key, False, None, -1
                ext = ext.lower()
                if not has_image and ("." + ext.rsplit(".", 1)[-1]) in IMAGE_EXTENSIONS:
                    has_image = True
                    image = archive.extractfile(member).read() if images else None
                elif ext in LABEL_EXTENSIONS:
                    text = archive.extractfile(member).read().decode("utf-8", "replace").strip()
                    label = _parse_label(text, path, member.name)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise UserError(f"cannot read tar {str(path)!r}: {err}") from None
    if key is not None and has_image:
        yield key, label, image


def _parse_label(text: str, path: Path, member: str) -> int:
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        raise UserError(f"{str(path)!r}: label member {member!r} must hold an integer, got {text[:40]!r}") from None
