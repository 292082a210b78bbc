"""What an output location holds before a job writes there (shards, embeddings), local or behind a URI."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs

from lejepa_platform.errors import UserError


def entries(filesystem: pafs.FileSystem, root: str, where: str) -> list[str] | None:
    """Names directly under `root` ([] when it does not exist); None when `root` is a file;
    UserError naming `where` when it cannot be reached."""
    try:
        kind = filesystem.get_file_info(root).type
        if kind == pafs.FileType.File:
            return None
        if kind != pafs.FileType.Directory:
            return []
        return [info.base_name for info in filesystem.get_file_info(pafs.FileSelector(root))]
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"cannot open {where!r}: {err}") from None
