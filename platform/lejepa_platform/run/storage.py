"""Run directories on local disk, a shared file system or an object store, through pyarrow.fs.

The driver keeps one small record per run (`lejepa_run.json`: resolved config, MLflow run id,
tracking URI) next to Ray Train's own files, so `--resume NAME` finds everything from the name.
The record never holds a secret: passwords in URIs (and values of secret-named keys) are masked
when it is written, so a run resumed from such a record must be given those values again.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from lejepa_platform.errors import UserError
from lejepa_platform.redact import MASK, redact_params, redact_uri
from lejepa_platform.tracking import resolve_tracking_uri
from lejepa_platform.train.checkpoint import STATE_FILE

RECORD = "lejepa_run.json"


def is_remote(storage_path: str) -> bool:
    """A URI (s3://, gs://, ...) rather than a local path."""
    return "://" in storage_path


def absolute_storage(storage_path: str) -> str:
    """Local paths become absolute (Ray Train requires it); URIs stay as they are."""
    return storage_path if is_remote(storage_path) else str(Path(storage_path).expanduser().resolve())


def _fs(storage_path: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(absolute_storage(storage_path))


def write_run_record(storage_path: str, name: str, record: dict[str, Any]) -> None:
    """Write the record, secrets masked, under a temporary name, then move it into place."""
    fs, root = _fs(storage_path)
    directory = f"{root}/{name}"
    fs.create_dir(directory, recursive=True)
    tmp, final = f"{directory}/.{RECORD}.tmp", f"{directory}/{RECORD}"
    with fs.open_output_stream(tmp) as out:
        out.write(json.dumps(redact_params(record), indent=2).encode())
    fs.move(tmp, final)


def check_unmasked(values: dict[str, Any]) -> None:
    """Refuse config values (flattened) that are still masked as a run record keeps them: a
    resumed run needs the secret they held again."""
    masked = sorted(key for key, value in values.items() if isinstance(value, str) and MASK in value)
    if masked:
        raise UserError(f"{', '.join(masked)} held a password, which the run record does not keep: pass "
                        + " ".join(f"--set {key}=..." for key in masked) + " again with --resume")


def recorded_tracking_uri(recorded: str, configured: str) -> str:
    """The tracking URI of a recorded run: as recorded, or when a password was masked out of it,
    the configured one (track.uri, else MLFLOW_TRACKING_URI) that it masks."""
    if MASK not in recorded:
        return recorded
    candidate = resolve_tracking_uri(configured)
    if MASK not in candidate and redact_uri(candidate) == recorded:
        return candidate
    raise UserError(f"the run was tracked at {recorded}, whose password is not recorded: give that URI with "
                    "--set track.uri=... or MLFLOW_TRACKING_URI")


@contextlib.contextmanager
def local_checkpoint(uri: str) -> Iterator[Path]:
    """A local copy of the checkpoint at `uri`, or of a run directory's latest checkpoint (their
    names sort by time), for as long as the block runs."""
    fs, path = _fs(uri)
    if fs.get_file_info(f"{path}/{STATE_FILE}").type != pafs.FileType.File:
        found = [i.path for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
                 if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")]
        if not found:
            raise UserError(f"{redact_uri(uri)} is neither a checkpoint nor a run directory with checkpoints")
        path = max(found)
    with tempfile.TemporaryDirectory(prefix="lejepa-checkpoint-") as tmp:
        pafs.copy_files(path, tmp, source_filesystem=fs)
        yield Path(tmp)


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
