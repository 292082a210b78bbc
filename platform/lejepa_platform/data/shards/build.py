"""Build Parquet image shards from any source.

Atomicity: a build writes into the sibling directory `OUT.partial`; each shard appears there only by
an atomic rename of a finished file, and the whole directory is renamed to OUT after the manifest is
in place. So OUT either does not exist or is complete; re-running an interrupted build with the same
arguments keeps the finished shards and continues after them (each shard records, in its Parquet
metadata, how far into the source it reaches).

Object storage: OUT may be a URI (s3://, gs://, hdfs://, file://). The build then runs as above in a
local staging directory (under the system temporary directory, kept until the upload succeeds, so a
re-run resumes it), after which every shard is uploaded and the manifest last: a reader that finds
the manifest finds every shard it names. A re-run after a failed upload uploads every shard again.
"""

from __future__ import annotations

import dataclasses
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

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from lejepa_platform import __version__
from lejepa_platform.batching import chunks
from lejepa_platform.config import DataConfig
from lejepa_platform.console import say
from lejepa_platform.data.decode import BadImage, array_to_image, count_reasons, encode, load_image, open_image
from lejepa_platform.data.sources import (LOCAL_FS, MANIFEST, SHARD_COLUMNS, RawRecord, is_uri, locate,
                                          open_source, read_manifest)
from lejepa_platform.errors import UserError

from lejepa_platform.data.shards.split import split_key, split_spec

FORMAT = "lejepa-shards/1"
ROW_GROUP_ROWS = 256
"""Rows per Parquet row group: the smallest unit a reader fetches."""
MAX_PIXELS = DataConfig().max_image_pixels
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("id", pa.string())])
_STATE = "build.json"
_META_END = b"lejepa.source_end"
_META_SKIPPED = b"lejepa.skipped"



@dataclasses.dataclass(frozen=True)
class _Options:
    image_format: str
    max_side: int
    max_pixels: int
    quiet: bool


def _shrink(image: Image.Image, max_side: int) -> Image.Image | None:
    width, height = image.size
    if max_side <= 0 or max(width, height) <= max_side:
        return None
    scale = max_side / max(width, height)
    if image.mode not in ("L", "LA", "RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS)


def _convert(record: RawRecord, opts: _Options) -> bytes | str:
    """Encoded bytes for the shard, or the skip reason."""
    try:
        if isinstance(record.payload, np.ndarray):
            image = array_to_image(record.payload)
            image = _shrink(image, opts.max_side) or image
            return encode(image, "jpeg" if opts.image_format == "jpeg" else "png")
        if opts.image_format == "keep":
            header = open_image(record.payload, opts.max_pixels)
            if opts.max_side <= 0 or max(header.size) <= opts.max_side:
                return bytes(record.payload)
            original = "jpeg" if header.format == "JPEG" else "png"
            return encode(_shrink(load_image(record.payload, opts.max_pixels), opts.max_side), original)
        image = load_image(record.payload, opts.max_pixels)
        return encode(_shrink(image, opts.max_side) or image, opts.image_format)
    except BadImage as err:
        return err.reason
    except ValueError:
        return "undecodable"


def digest_table(table: pa.Table) -> str:
    digest = hashlib.sha256()
    for image, label, record_id in zip(table.column("image").to_pylist(), table.column("label").to_pylist(),
                                       table.column("id").to_pylist()):
        digest.update(f"{record_id}\t{label}\t".encode() + hashlib.sha256(image).digest())
    return digest.hexdigest()


class _Staging:
    """The OUT.partial directory: finished shards, the build state, and the atomic hand-over."""

    def __init__(self, out: Path, plan: str) -> None:
        self.out = out
        self.dir = out.with_name(out.name + ".partial")
        self.plan = plan
        self.created = False

    def resume(self) -> list[Path]:
        """Finished shards of an earlier run of the same plan; anything else there is cleared."""
        if not self.dir.exists():
            return []
        state = self.dir / _STATE
        if state.is_file() and json.loads(state.read_text()).get("plan") == self.plan:
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

    def write(self, index: int, table: pa.Table) -> Path:
        if not self.dir.exists():
            try:
                self.dir.mkdir(parents=True)
            except OSError as err:
                raise UserError(f"cannot write to {str(self.out)!r}: {err.strerror or err}") from None
            self.created = True
            _atomic_write(self.dir / _STATE, json.dumps({"plan": self.plan}))
        final = self.dir / _shard_name(index)
        tmp = self.dir / f".{final.name}.tmp"
        try:
            pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS, compression="zstd")
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


def build_shards(source: str, out: str, *, rows_per_shard: int = 4096, image_format: str = "keep",
                 max_side: int = 0, class_names: Sequence[str] | None = None, test_fraction: float = 0.0,
                 split_seed: int = 0, meta: dict | None = None, quiet: bool = False) -> dict:
    """Convert `source` into Parquet shards in `out` (see the module docstring); JSON-ready summary.

    image_format: keep (store encoded files as they are; arrays become PNG), png (lossless) or jpeg.
    max_side: downscale so the longer side is at most this many pixels (0: never).
    class_names: override the names found in the source. test_fraction / split_seed: record a fixed
    stratified split in the manifest. meta: extra manifest entries (name, licence, description).
    quiet: no progress lines (--json).
    """
    started = time.perf_counter()
    if rows_per_shard < 1:
        raise UserError(f"rows per shard = {rows_per_shard} is not allowed: must be >= 1")
    if image_format not in ("keep", "png", "jpeg"):
        raise UserError(f"image format {image_format!r} is not allowed: must be one of keep, png, jpeg")
    if max_side < 0:
        raise UserError(f"max side = {max_side} is not allowed: must be >= 0 (0: never downscale)")
    if not 0.0 <= test_fraction < 1.0:
        raise UserError(f"test fraction = {test_fraction} is not allowed: must be in [0, 1)")
    src = open_source(source)
    names = list(class_names) if class_names is not None else src.class_names()
    upload = _Upload(out, quiet) if is_uri(out) else None
    settings = {"format": FORMAT, "source": src.fingerprint(), "kind": src.kind, "rows_per_shard": rows_per_shard,
                "image_format": image_format, "max_side": max_side, "class_names": names,
                "test_fraction": test_fraction, "split_seed": split_seed, "meta": meta or {}, "max_pixels": MAX_PIXELS}
    plan = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    if upload is not None and (manifest := upload.finished(plan)) is not None:
        return _summary(out, manifest, "unchanged", 0, started)
    out_path = upload.staging if upload is not None else Path(out).expanduser().resolve()
    if out_path.exists():
        if (out_path / MANIFEST).is_file():
            manifest = read_manifest(out_path)
            if manifest.get("build", {}).get("plan") == plan:
                return _finish(upload, out_path, manifest, "unchanged", 0, started)
            raise UserError(f"{str(out_path)!r} already holds shards of a different build; delete it or choose another")
        if not out_path.is_dir() or any(out_path.iterdir()):
            raise UserError(f"{str(out_path)!r} exists and is not an empty directory")
    _check_writable(out_path)
    staging = _Staging(out_path, plan)
    done = staging.resume()
    try:
        manifest = _write_all(src, staging, done, names, rows_per_shard, split_seed,
                              _Options(image_format, max_side, MAX_PIXELS, quiet))
    except UserError:
        staging.abandon()  # bad input: leave nothing behind; an interruption keeps its shards for a re-run
        raise
    manifest.update({"source": src.describe(), "image_format": image_format, "max_side": max_side,
                     "rows_per_shard": rows_per_shard})
    labels, keys = manifest.pop("_labels"), manifest.pop("_keys")
    manifest["split"] = split_spec(labels, keys, test_fraction, split_seed) if test_fraction > 0 else None
    manifest["build"] = {"plan": plan, "tool": f"lejepa_platform {__version__}"}
    manifest = {"format": FORMAT, "name": (meta or {}).get("name", out_path.name), **(meta or {}), **manifest}
    staging.finish(manifest)
    return _finish(upload, out_path, manifest, "resumed" if done else "built", len(done), started)


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
        try:
            info = self.filesystem.get_file_info(self.root)
            entries = ([] if info.type != pafs.FileType.Directory else
                       [e.base_name for e in self.filesystem.get_file_info(pafs.FileSelector(self.root))])
        except (pa.ArrowException, OSError) as err:
            raise UserError(f"cannot open {self.uri!r}: {err}") from None
        if info.type == pafs.FileType.File:
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


def _put(local: Path, filesystem: pafs.FileSystem, path: str) -> None:
    """Copy one local file to `path` in `filesystem` (on object storage it appears whole or not at all)."""
    pafs.copy_files(str(local), path, source_filesystem=LOCAL_FS, destination_filesystem=filesystem)


def _write_all(src, staging: _Staging, done: list[Path], names: list[str], rows_per_shard: int, split_seed: int,
               opts: _Options) -> dict:
    """Stream the source into shards after the `done` ones; the manifest's counting part."""
    shards, labels, keys, skipped, consumed = [], [], [], Counter(), 0
    for path in done:
        table = pq.read_table(path, columns=list(SHARD_COLUMNS))
        meta = pq.read_schema(path).metadata or {}
        consumed = int(meta[_META_END])
        skipped.update(json.loads(meta[_META_SKIPPED]))
        shards.append({"file": path.name, "rows": table.num_rows, "sha256": digest_table(table)})
        labels.append(table.column("label").to_numpy())
        keys.append(np.array([split_key(split_seed, i) for i in table.column("id").to_pylist()], dtype=np.int64))
    buffer: list[tuple[bytes, int, str]] = []
    shard_skipped: Counter = Counter()

    def flush() -> None:
        table = pa.Table.from_arrays([pa.array([b[0] for b in buffer], pa.binary()),
                                      pa.array([b[1] for b in buffer], pa.int64()),
                                      pa.array([b[2] for b in buffer], pa.string())], schema=SCHEMA)
        table = table.replace_schema_metadata({_META_END: str(consumed), _META_SKIPPED: json.dumps(shard_skipped)})
        path = staging.write(len(shards), table)
        shards.append({"file": path.name, "rows": table.num_rows, "sha256": digest_table(table)})
        labels.append(table.column("label").to_numpy())
        keys.append(np.array([split_key(split_seed, b[2]) for b in buffer], dtype=np.int64))
        skipped.update(shard_skipped)
        say(opts.quiet, f"shards: wrote {path.name} ({table.num_rows} rows, {sum(s['rows'] for s in shards)} so far)")
        buffer.clear()
        shard_skipped.clear()

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for chunk in chunks(src.records(skip=consumed), 256):
            for record, result in zip(chunk, pool.map(lambda r: _convert(r, opts), chunk)):
                consumed += 1
                if isinstance(result, str):
                    shard_skipped[result] += 1
                    continue
                if record.label < -1 or (names and record.label >= len(names)):
                    raise UserError(f"record {record.id!r} has label {record.label}; allowed: -1 (unlabelled) or "
                                    f"0..{len(names) - 1} for the {len(names)} class names" if names else
                                    f"record {record.id!r} has label {record.label}; allowed: -1 or >= 0")
                buffer.append((result, record.label, record.id))
                if len(buffer) == rows_per_shard:
                    flush()
    if buffer:
        flush()
    skipped.update(shard_skipped)
    all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    if len(all_labels) == 0:
        reasons = count_reasons([skipped])
        raise UserError(f"no readable images in {src.name!r} ({consumed} records, skipped: "
                        + ", ".join(f"{k} {v}" for k, v in reasons.items()) + ")")
    if not names and (all_labels >= 0).any():
        names = [str(i) for i in range(int(all_labels.max()) + 1)]
    counts = np.bincount(all_labels[all_labels >= 0], minlength=len(names)) if names else np.zeros(0, np.int64)
    return {"rows": int(len(all_labels)), "shards": shards, "classes": names,
            "class_counts": [int(c) for c in counts], "unlabelled": int((all_labels < 0).sum()),
            "skipped": count_reasons([skipped]),
            "content_hash": hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest(),
            "_labels": all_labels, "_keys": np.concatenate(keys)}


def _summary(out: Path | str, manifest: dict, status: str, resumed: int, started: float) -> dict:
    keys = ("name", "rows", "classes", "class_counts", "unlabelled", "skipped", "split", "content_hash", "source")
    summary = {"out": str(out), "status": status, **{k: manifest.get(k) for k in keys}}
    summary["shards"] = len(manifest["shards"])
    summary["resumed_shards"] = resumed
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary

