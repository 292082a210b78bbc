"""An image folder: one subfolder per class, or flat and unlabelled (searched recursively)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from lejepa_platform.data.sources.base import IMAGE_EXTENSIONS, RawRecord, Source, is_image_name
from lejepa_platform.errors import UserError


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
                files = walk_images(sub, path)
                if files:
                    entries.extend((rel, len(self._classes)) for rel in files)
                    self._classes.append(sub.name)
        if direct or not entries:
            self._classes = []
            entries = [(rel, -1) for rel in walk_images(path, path)]
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


def walk_images(folder: Path, root: Path) -> list[str]:
    """Image files under `folder`, as sorted posix paths relative to `root` (hidden entries skipped)."""
    found = []
    for current, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_dir = Path(current).relative_to(root)
        found.extend((rel_dir / f).as_posix() for f in files if is_image_name(f))
    return sorted(found)
