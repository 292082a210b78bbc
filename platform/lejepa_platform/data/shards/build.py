"""Build Parquet image shards from any source, in this process or on Ray Data.

Atomicity: a build writes into the sibling directory `OUT.partial`; each shard appears there only by
an atomic rename of a finished file, and the whole directory is renamed to OUT after the manifest is
in place. So OUT either does not exist or is complete; re-running an interrupted build with the same
arguments keeps the finished shards and continues after them (each shard records, in its Parquet
metadata, how far into the source it reaches).

Object storage: OUT may be a URI (s3://, gs://, hdfs://, file://). The build then runs as above in a
local staging directory (under the system temporary directory, kept until the upload succeeds, so a
re-run resumes it), after which every shard is uploaded and the manifest last: a reader that finds
the manifest finds every shard it names. A re-run after a failed upload uploads every shard again.

On a Ray cluster (`address`): on_ray.py reads and converts the records in Ray Data tasks and its
tasks write the shards, into OUT.partial (renamed to OUT once the manifest is in it) or straight
under a URI (the manifest last); the manifest, split and counts are made here from what they report,
by the same code as above. Such a build starts over when re-run after an interruption.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lejepa_platform import __version__
from lejepa_platform.batching import chunks
from lejepa_platform.config import DataConfig
from lejepa_platform.console import say, warn
from lejepa_platform.data.sources import (LOCAL_FS, MANIFEST, SHARD_COLUMNS, ArraySource, IdxSource, Source, is_uri,
                                          locate, open_source, read_manifest)
from lejepa_platform.errors import UserError

from lejepa_platform.data.shards.convert import (Conversion, check_label, convert_record, shard_table,
                                                 write_shard)
from lejepa_platform.data.shards.destination import entries as listed
from lejepa_platform.data.shards.split import split_spec
from lejepa_platform.data.shards.tally import Written, manifest_counts

FORMAT = "lejepa-shards/1"
MAX_PIXELS = DataConfig().max_image_pixels
_STATE = "build.json"
_META_END = b"lejepa.source_end"
_META_SKIPPED = b"lejepa.skipped"


class _Staging:
    """The OUT.partial directory: finished shards, the build state, and the atomic hand-over.

    `resumable`: a single-process build continues after the shards an interrupted run of the same
    plan left here; a Ray build (whose tasks write shards in any order) starts over.
    """

    def __init__(self, out: Path, plan: str, *, resumable: bool = True) -> None:
        self.out = out
        self.dir = out.with_name(out.name + ".partial")
        self.plan = plan
        self.resumable = resumable
        self.created = False

    def resume(self) -> list[Path]:
        """Finished shards of an earlier run of the same plan; anything else there is cleared."""
        if not self.dir.exists():
            return []
        state = self.dir / _STATE
        if self.resumable and state.is_file() and json.loads(state.read_text()) == self._state():
            done = []
            while (self.dir / _shard_name(len(done))).is_file():
                done.append(self.dir / _shard_name(len(done)))
            return done
        ours = all(p.name.startswith(("part-", ".part-", MANIFEST, f".{MANIFEST}", _STATE, f".{_STATE}"))
                   for p in self.dir.iterdir())
        if not ours:
            raise UserError(f"{str(self.dir)!r} exists and was not made by `lejepa shards build`; move it away")
        shutil.rmtree(self.dir)
        return []

    def open(self) -> Path:
        """The staging directory, created with its state file when it does not exist yet."""
        if not self.dir.exists():
            try:
                self.dir.mkdir(parents=True)
            except OSError as err:
                raise UserError(f"cannot write to {str(self.out)!r}: {err.strerror or err}") from None
            self.created = True
            _atomic_write(self.dir / _STATE, json.dumps(self._state()))
        return self.dir

    def _state(self) -> dict:
        return {"plan": self.plan, "resumable": self.resumable}

    def write(self, index: int, table: pa.Table) -> Path:
        final = self.open() / _shard_name(index)
        tmp = self.dir / f".{final.name}.tmp"
        try:
            write_shard(table, str(tmp), LOCAL_FS)
            os.replace(tmp, final)
        except OSError as err:
            raise UserError(f"cannot write to {str(self.out)!r}: {err.strerror or err}") from None
        return final

    def finish(self, manifest: dict) -> None:
        _atomic_write(self.dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        (self.dir / _STATE).unlink()
        if self.out.is_dir():
            self.out.rmdir()  # empty (checked before the build)
        os.rename(self.dir, self.out)

    def abandon(self) -> None:
        """Remove a staging directory this run created and filled with nothing worth resuming."""
        if self.created:
            shutil.rmtree(self.dir, ignore_errors=True)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _check_writable(out: Path) -> None:
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {str(out)!r}: {str(probe)!r} is not a writable directory")


def _check_options(rows_per_shard: int, image_format: str, max_side: int, test_fraction: float) -> None:
    if rows_per_shard < 1:
        raise UserError(f"rows per shard = {rows_per_shard} is not allowed: must be >= 1")
    if image_format not in ("keep", "png", "jpeg"):
        raise UserError(f"image format {image_format!r} is not allowed: must be one of keep, png, jpeg")
    if max_side < 0:
        raise UserError(f"max side = {max_side} is not allowed: must be >= 0 (0: never downscale)")
    if not 0.0 <= test_fraction < 1.0:
        raise UserError(f"test fraction = {test_fraction} is not allowed: must be in [0, 1)")


def build_shards(source: str, out: str, *, rows_per_shard: int = 4096, image_format: str = "keep",
                 max_side: int = 0, class_names: Sequence[str] | None = None, test_fraction: float = 0.0,
                 split_seed: int = 0, meta: dict | None = None, quiet: bool = False,
                 address: str | None = None) -> dict:
    """Convert `source` into Parquet shards in `out` (see the module docstring); JSON-ready summary.

    image_format: keep (store encoded files as they are; arrays become PNG), png (lossless) or jpeg.
    max_side: downscale so the longer side is at most this many pixels (0: never).
    class_names: override the names found in the source. test_fraction / split_seed: record a fixed
    stratified split in the manifest. meta: extra manifest entries (name, licence, description).
    quiet: no progress lines (--json). address: build on Ray Data on this cluster ("local": a new
    local one; the cluster this process is connected to, when it is); None builds in this process.
    """
    started = time.perf_counter()
    _check_options(rows_per_shard, image_format, max_side, test_fraction)
    src = open_source(source)
    names = list(class_names) if class_names is not None else src.class_names()
    settings = {"format": FORMAT, "source": src.fingerprint(), "kind": src.kind, "rows_per_shard": rows_per_shard,
                "image_format": image_format, "max_side": max_side, "class_names": names,
                "test_fraction": test_fraction, "split_seed": split_seed, "meta": meta or {}, "max_pixels": MAX_PIXELS}
    job = _Job(source, src, names, hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest(),
               rows_per_shard, split_seed, Conversion(image_format, max_side, MAX_PIXELS), quiet)
    extra = {"source": src.describe(), "image_format": image_format, "max_side": max_side,
             "rows_per_shard": rows_per_shard, "test_fraction": test_fraction, "meta": meta or {}}
    if address is not None and isinstance(src, (ArraySource, IdxSource)):
        warn(f"{source!r} is one {src.kind} file, read by one process: building it here, not on Ray")
        address = None
    upload = _Upload(out, quiet) if is_uri(out) else None
    if upload is not None and (manifest := upload.finished(job.plan)) is not None:
        return _summary(out, manifest, "unchanged", 0, started)
    if upload is not None and address is not None:
        return _build_on_ray_to_uri(job, upload, extra, address, started)
    out_path = upload.staging if upload is not None else Path(out).expanduser().resolve()
    if out_path.exists():
        if (out_path / MANIFEST).is_file():
            manifest = read_manifest(out_path)
            if manifest.get("build", {}).get("plan") == job.plan:
                return _finish(upload, out_path, manifest, "unchanged", 0, started)
            raise UserError(f"{str(out_path)!r} already holds shards of a different build; delete it or choose another")
        if not out_path.is_dir() or any(out_path.iterdir()):
            raise UserError(f"{str(out_path)!r} exists and is not an empty directory")
    _check_writable(out_path)
    staging = _Staging(out_path, job.plan, resumable=address is None)
    done = staging.resume()
    try:
        written = (_write_all(job, staging, done) if address is None else
                   job.on_ray(address, LOCAL_FS, str(staging.open())))
        manifest = _manifest(job, written, out_path.name, extra)
    except UserError:
        staging.abandon()  # bad input: leave nothing behind; an interruption keeps its shards for a re-run
        raise
    staging.finish(manifest)
    return _finish(upload, out_path, manifest, "resumed" if done else "built", len(done), started)


class _Job:
    """One build: the source, its class names, the plan digest that names the build, and how records
    are converted and grouped into shards."""

    def __init__(self, where: str, src: Source, names: list[str], plan: str, rows_per_shard: int,
                 split_seed: int, conversion: Conversion, quiet: bool) -> None:
        self.where, self.src, self.names, self.plan = where, src, names, plan
        self.rows_per_shard, self.split_seed, self.conversion, self.quiet = rows_per_shard, split_seed, conversion, quiet

    def on_ray(self, address: str, filesystem: pafs.FileSystem, directory: str) -> Written:
        """The shards written by Ray Data tasks into `directory` (see on_ray.py)."""
        from lejepa_platform.data.shards.on_ray import write_on_ray

        return write_on_ray(self.where, self.names, self.conversion, self.rows_per_shard, self.split_seed,
                            address=address, filesystem=filesystem, directory=directory, quiet=self.quiet)


def _manifest(job: _Job, written: Written, name: str, extra: dict) -> dict:
    """The manifest of a finished build: counts, source and settings, split, the plan that names it."""
    counted, labels, keys = manifest_counts(written, job.names, job.src.name)
    fraction, meta = extra["test_fraction"], extra["meta"]
    counted.update({k: v for k, v in extra.items() if k not in ("test_fraction", "meta")})
    counted["split"] = split_spec(labels, keys, fraction, job.split_seed) if fraction > 0 else None
    counted["build"] = {"plan": job.plan, "tool": f"lejepa_platform {__version__}"}
    return {"format": FORMAT, "name": meta.get("name", name), **meta, **counted}


def _build_on_ray_to_uri(job: _Job, upload: _Upload, extra: dict, address: str, started: float) -> dict:
    """Ray tasks write the shards straight under the URI, then the manifest goes up last; on bad input
    the shards written are deleted again."""
    upload.clear_shards()
    try:
        written = job.on_ray(address, upload.filesystem, upload.root)
        manifest = _manifest(job, written, upload.root.rsplit("/", 1)[-1], extra)
    except UserError:
        upload.clear_shards()
        raise
    upload.put_manifest(manifest)
    return _summary(upload.uri, manifest, "built", 0, started)


def _finish(upload: _Upload | None, out: Path, manifest: dict, status: str, resumed: int, started: float) -> dict:
    """The summary of a local build, after uploading it when OUT is a URI."""
    if upload is None:
        return _summary(out, manifest, status, resumed, started)
    upload.send(out, manifest)
    return _summary(upload.uri, manifest, "resumed" if status == "unchanged" else status, resumed, started)


class _Upload:
    """OUT given as a URI: where its local staging build lives, and the upload of the finished build."""

    def __init__(self, uri: str, quiet: bool) -> None:
        self.uri, self.quiet = uri, quiet
        self.filesystem, self.root = locate(uri, must_exist=False)
        key = hashlib.sha256(uri.encode()).hexdigest()[:16]
        self.staging = Path(tempfile.gettempdir()) / "lejepa-shards" / key / self.root.rsplit("/", 1)[-1]

    def finished(self, plan: str) -> dict | None:
        """The manifest when OUT already holds this build; UserError when it holds anything else."""
        entries = listed(self.filesystem, self.root, self.uri)
        if entries is None:
            raise UserError(f"{self.uri!r} exists and is not a directory")
        if MANIFEST in entries:
            manifest = read_manifest(self.root, self.filesystem, where=self.uri)
            if manifest.get("build", {}).get("plan") == plan:
                return manifest
            raise UserError(f"{self.uri!r} already holds shards of a different build; delete it or choose another")
        if any(not name.startswith("part-") for name in entries):  # shards of an interrupted upload are fine
            raise UserError(f"{self.uri!r} exists and is not empty; choose an empty or new location")
        staged = self.staging / MANIFEST
        if staged.is_file() and read_manifest(self.staging).get("build", {}).get("plan") != plan:
            shutil.rmtree(self.staging)  # a staged build of other settings for this URI, never uploaded
        return None

    def send(self, staged: Path, manifest: dict) -> None:
        """Every shard, then the manifest; shards left by an earlier interrupted upload are replaced or removed."""
        names = [entry["file"] for entry in manifest["shards"]]
        try:
            self.filesystem.create_dir(self.root)
            for name in names:
                _put(staged / name, self.filesystem, f"{self.root}/{name}")
                say(self.quiet, f"shards: uploaded {name}")
            for info in self.filesystem.get_file_info(pafs.FileSelector(self.root)):
                if info.base_name.startswith("part-") and info.base_name not in names:
                    self.filesystem.delete_file(info.path)
            _put(staged / MANIFEST, self.filesystem, f"{self.root}/{MANIFEST}")
        except (pa.ArrowException, OSError) as err:
            raise UserError(f"cannot write to {self.uri!r}: {err} (re-run to upload again)") from None
        shutil.rmtree(self.staging.parent, ignore_errors=True)


    def clear_shards(self) -> None:
        """Delete the part-* files under OUT (left by an interrupted build, or written by a failed one)."""
        try:
            infos = self.filesystem.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
            for info in infos:
                if info.base_name.startswith("part-"):
                    self.filesystem.delete_file(info.path)
        except (pa.ArrowException, OSError) as err:
            raise UserError(f"cannot write to {self.uri!r}: {err}") from None

    def put_manifest(self, manifest: dict) -> None:
        """The manifest, written last: from now on OUT reads as a finished build."""
        try:
            with self.filesystem.open_output_stream(f"{self.root}/{MANIFEST}") as handle:
                handle.write((json.dumps(manifest, indent=2) + "\n").encode())
        except (pa.ArrowException, OSError) as err:
            raise UserError(f"cannot write to {self.uri!r}: {err} (re-run to build again)") from None


def _put(local: Path, filesystem: pafs.FileSystem, path: str) -> None:
    """Copy one local file to `path` in `filesystem` (on object storage it appears whole or not at all)."""
    pafs.copy_files(str(local), path, source_filesystem=LOCAL_FS, destination_filesystem=filesystem)


def _write_all(job: _Job, staging: _Staging, done: list[Path]) -> Written:
    """Stream the source into shards after the `done` ones, converting records on a thread pool."""
    written = Written(job.split_seed)
    for path in done:
        table = pq.read_table(path, columns=list(SHARD_COLUMNS))
        meta = pq.read_schema(path).metadata or {}
        written.add(path.name, table, json.loads(meta[_META_SKIPPED]), int(meta[_META_END]) - written.records)
    buffer: list[tuple[bytes, int, str]] = []
    shard_skipped: Counter = Counter()
    consumed = written.records

    def flush() -> None:
        table = shard_table(*zip(*buffer))
        table = table.replace_schema_metadata({_META_END: str(consumed), _META_SKIPPED: json.dumps(shard_skipped)})
        path = staging.write(len(written.shards), table)
        written.add(path.name, table, shard_skipped, consumed - written.records)
        say(job.quiet, f"shards: wrote {path.name} ({table.num_rows} rows, {written.total_rows()} so far)")
        buffer.clear()
        shard_skipped.clear()

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for chunk in chunks(job.src.records(skip=consumed), 256):
            for record, result in zip(chunk, pool.map(lambda r: convert_record(r, job.conversion), chunk)):
                consumed += 1
                if isinstance(result, str):
                    shard_skipped[result] += 1
                    continue
                check_label(record, job.names)
                buffer.append((result, record.label, record.id))
                if len(buffer) == job.rows_per_shard:
                    flush()
    if buffer:
        flush()
    written.add_counted(None, shard_skipped, consumed - written.records)
    return written


def _summary(out: Path | str, manifest: dict, status: str, resumed: int, started: float) -> dict:
    keys = ("name", "rows", "classes", "class_counts", "unlabelled", "skipped", "split", "content_hash", "source")
    summary = {"out": str(out), "status": status, **{k: manifest.get(k) for k in keys}}
    summary["shards"] = len(manifest["shards"])
    summary["resumed_shards"] = resumed
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary

