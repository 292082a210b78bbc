"""Run directories on local disk, a shared file system or an object store, through pyarrow.fs.

The driver keeps one small record per run (`lejepa_run.json`: resolved config, MLflow run id,
tracking URI) next to Ray Train's own files, so `--resume NAME` finds everything from the name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from lejepa_platform.errors import UserError

RECORD = "lejepa_run.json"


def absolute_storage(storage_path: str) -> str:
    """Local paths become absolute (Ray Train requires it); URIs stay as they are."""
    return storage_path if "://" in storage_path else str(Path(storage_path).expanduser().resolve())


def _fs(storage_path: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(absolute_storage(storage_path))


def write_run_record(storage_path: str, name: str, record: dict[str, Any]) -> None:
    """Write the record under a temporary name, then move it into place."""
    fs, root = _fs(storage_path)
    directory = f"{root}/{name}"
    fs.create_dir(directory, recursive=True)
    tmp, final = f"{directory}/.{RECORD}.tmp", f"{directory}/{RECORD}"
    with fs.open_output_stream(tmp) as out:
        out.write(json.dumps(record, indent=2).encode())
    fs.move(tmp, final)


def read_run_record(storage_path: str, name: str) -> dict[str, Any]:
    fs, root = _fs(storage_path)
    path = f"{root}/{name}/{RECORD}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        known = list_runs(storage_path)
        hint = f"; runs there: {', '.join(known[-5:])}" if known else ""
        raise UserError(f"no run named {name!r} under {absolute_storage(storage_path)}{hint}")
    with fs.open_input_stream(path) as src:
        return json.loads(src.read().decode())


def run_exists(storage_path: str, name: str) -> bool:
    fs, root = _fs(storage_path)
    return fs.get_file_info(f"{root}/{name}").type != pafs.FileType.NotFound


def list_runs(storage_path: str) -> list[str]:
    fs, root = _fs(storage_path)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(root))
    return sorted(os.path.basename(i.path) for i in infos
                  if i.type == pafs.FileType.Directory and fs.get_file_info(f"{i.path}/{RECORD}").type == pafs.FileType.File)
