"""An embeddings directory (what `lejepa embed` writes, what `lejepa eval` reads), and the reads and
decoding that feed the embedding job on Ray Data.

Layout of OUT (a local directory or a URI pyarrow opens):

    manifest.json    written last: FORMAT, the job, run, backbone, features, dimension, count, files
    data/*.parquet   one row per embedded image: id (string), label (int64, -1 when unlabelled),
                     split ("train" / "test" for a source with its own split, else null), position
                     (the record's place in the source's stored order) and embedding
                     (fixed_size_list<float32>[dimension])
    .job.json        while the job is unfinished: what it embeds, so a re-run knows it is the same job
    .checkpoint/     while the job is unfinished: Ray Data's write checkpoint (the ids written)

Nothing reads as embeddings without the manifest. Rows come from the source's plan
(data/reader.py) by `raw_rows`, one read task per unit, and become the evaluation view of
`lejepa eval` (`reader.eval_views`) in `view_batch`; the model runs in run/embed.py.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lejepa_platform.data.reader import Plan, Unit, eval_views, load_unit, with_split
from lejepa_platform.data.shards import split_mask
from lejepa_platform.data.shards.destination import entries
from lejepa_platform.data.sources import MANIFEST, is_uri, locate
from lejepa_platform.errors import UserError

FORMAT = "lejepa-embeddings/1"
DATA_DIR = "data"
CHECKPOINT_DIR = ".checkpoint"
JOB_FILE = ".job.json"


class EmbeddingsDir:
    """OUT of an embedding job: what it holds now, and the writes that make it complete."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.filesystem, self.root = locate(where if is_uri(where) else Path(where).expanduser().resolve(),
                                            must_exist=False)

    def path(self, name: str) -> str:
        """Where `name` (DATA_DIR, CHECKPOINT_DIR, ...) lives, as a URI or local path Ray Data can open."""
        return f"{self.where.rstrip('/')}/{name}" if is_uri(self.where) else f"{self.root}/{name}"

    def state(self, job: dict) -> str:
        """"new" (OUT is empty or absent), "resume" (an unfinished run of this job), "done" (this job,
        finished); UserError when OUT holds anything else."""
        names = entries(self.filesystem, self.root, self.where)
        if names is None:
            raise UserError(f"{self.where!r} exists and is not a directory; give a new or empty directory, or "
                            f"the embeddings directory of this job to resume it")
        if not names:
            return "new"
        stored = self._json(MANIFEST) if MANIFEST in names else self._json(JOB_FILE) if JOB_FILE in names else None
        if not isinstance(stored, dict) or stored.get("format") != FORMAT:
            raise UserError(f"{self.where!r} exists and is not an embeddings directory (no {MANIFEST} of "
                            f"`lejepa embed`); give a new or empty directory")
        if stored.get("job") != job.get("job"):
            raise UserError(f"{self.where!r} holds embeddings of another run, data or features; delete it or "
                            f"choose another directory")
        return "done" if MANIFEST in names else "resume"

    def manifest(self) -> dict:
        """The manifest of a finished job; UserError when there is none."""
        if self.filesystem.get_file_info(f"{self.root}/{MANIFEST}").type != pafs.FileType.File:
            raise UserError(f"{self.where!r} has no {MANIFEST}: not a finished embeddings directory "
                            f"(an interrupted `lejepa embed` continues when run again)")
        manifest = self._json(MANIFEST)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise UserError(f"{self.where!r}/{MANIFEST} is not the manifest of `lejepa embed`")
        return manifest

    def data_files(self) -> list[str]:
        """The Parquet files under DATA_DIR, relative to OUT, sorted."""
        selector = pafs.FileSelector(f"{self.root}/{DATA_DIR}", allow_not_found=True)
        return sorted(f"{DATA_DIR}/{info.base_name}" for info in self.filesystem.get_file_info(selector)
                      if info.base_name.endswith(".parquet"))

    def rows(self, files: list[str]) -> int:
        """Rows in these data files (from their footers)."""
        return sum(pq.ParquetFile(f"{self.root}/{file}", filesystem=self.filesystem).metadata.num_rows
                   for file in files)

    def written_rows(self) -> int:
        """Rows in the data files written so far (a file still being written counts once it is whole)."""
        total = 0
        for file in self.data_files():
            try:
                total += self.rows([file])
            except (OSError, pa.ArrowException):
                continue
        return total

    def start(self, job: dict) -> None:
        """Mark OUT as this job's before anything else is written to it."""
        self.filesystem.create_dir(self.root, recursive=True)
        self._put(JOB_FILE, job)

    def finish(self, manifest: dict) -> None:
        """Write the manifest (from now on OUT reads as complete), then drop the job's working files."""
        self._put(MANIFEST, manifest)
        for name, delete in ((CHECKPOINT_DIR, self.filesystem.delete_dir), (JOB_FILE, self.filesystem.delete_file)):
            if self.filesystem.get_file_info(f"{self.root}/{name}").type != pafs.FileType.NotFound:
                delete(f"{self.root}/{name}")

    def remove(self) -> None:
        """Delete OUT and everything in it (a job that wrote nothing worth keeping)."""
        self.filesystem.delete_dir(self.root)

    def _json(self, name: str) -> object:
        try:
            with self.filesystem.open_input_stream(f"{self.root}/{name}") as handle:
                return json.loads(handle.read())
        except (OSError, pa.ArrowException, ValueError):
            return None

    def _put(self, name: str, value: dict) -> None:
        with self.filesystem.open_output_stream(f"{self.root}/{name}") as handle:
            handle.write((json.dumps(value, indent=2) + "\n").encode())


# --------------------------------------------------------------------------------------------
# The job's reads: rows of the source with their place in it and their side of its split.


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a plan's rows sit: each unit's first position in the stored order, and which units are
    test and train files when the split is by file (Hub train-* / test-* files)."""

    starts: dict[Unit, int]
    test_files: frozenset[str] = frozenset()
    train_files: frozenset[str] = frozenset()


def place(plan: Plan) -> Placement:
    """The placement of `plan` (a plan of every row of its source)."""
    starts, position = {}, 0
    for unit in plan.units:
        starts[unit] = position
        position += unit.rows
    if plan.split_spec is None or plan.split_spec.get("method") != "files":
        return Placement(starts)
    files = {split: frozenset(u.path for u in with_split(plan, split).units) for split in ("test", "train")}
    return Placement(starts, files["test"], files["train"])


def raw_rows(unit: Unit, plan: Plan, *, placement: Placement) -> Iterator[pa.Table]:
    """A unit's records as rows: image (encoded bytes), label, id, position and split."""
    position = placement.starts[unit]
    for images, labels, ids in load_unit(unit, plan):
        yield pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int64()),
                        "id": pa.array(ids, pa.string()),
                        "position": pa.array(np.arange(position, position + len(ids)), pa.int64()),
                        "split": pa.array(_sides(unit, plan, placement, ids, labels), pa.string())})
        position += len(ids)


def _sides(unit: Unit, plan: Plan, placement: Placement, ids: list[str], labels: np.ndarray) -> list[str | None]:
    if plan.split_spec is None:
        return [None] * len(ids)
    if plan.split_spec.get("method") == "files":
        side = "test" if unit.path in placement.test_files else "train" if unit.path in placement.train_files else None
        return [side] * len(ids)
    test = split_mask(ids, labels, plan.split_spec, "test")
    return ["test" if t else "train" for t in test]


def view_batch(batch: dict[str, np.ndarray], *, size: int, max_pixels: int) -> dict[str, np.ndarray]:
    """Rows of `raw_rows` with the image replaced by its evaluation view (uint8 (3, S, S)); rows whose
    image cannot be decoded are dropped."""
    views, kept, _ = eval_views(list(batch["image"]), size, max_pixels)
    return {"view": views, **{k: v[kept] for k, v in batch.items() if k != "image"}}


def embedding_table(batch: dict[str, np.ndarray], features: np.ndarray) -> pa.Table:
    """The rows written for a batch of `view_batch` rows and their features (float32 (B, D)). A split
    column of nulls only reaches the batch as NaNs: anything not a string is null."""
    flat = pa.array(np.ascontiguousarray(features, dtype=np.float32).reshape(-1), pa.float32())
    return pa.table({"id": pa.array(list(batch["id"]), pa.string()), "label": pa.array(batch["label"], pa.int64()),
                     "split": pa.array([s if isinstance(s, str) else None for s in batch["split"]], pa.string()),
                     "position": pa.array(batch["position"], pa.int64()),
                     "embedding": pa.FixedSizeListArray.from_arrays(flat, features.shape[1])})


# --------------------------------------------------------------------------------------------
# Reading a finished directory back.


@dataclasses.dataclass(frozen=True)
class Embeddings:
    """A finished embeddings directory in memory, rows in the source's stored order."""

    manifest: dict
    ids: list[str]
    labels: np.ndarray
    split: list[str | None]
    features: np.ndarray
    """float32 (N, dimension)."""


def is_embeddings_dir(where: str) -> bool:
    """True when `where` is a directory with the manifest `lejepa embed` writes."""
    try:
        EmbeddingsDir(where).manifest()
    except UserError:
        return False
    return True


def read_embeddings(where: str) -> Embeddings:
    """Every row of a finished embeddings directory, sorted by position."""
    folder = EmbeddingsDir(where)
    manifest = folder.manifest()
    tables = [pq.read_table(f"{folder.root}/{file}", filesystem=folder.filesystem) for file in manifest["files"]]
    table = pa.concat_tables(tables).sort_by("position")
    flat = np.array(table.column("embedding").combine_chunks().flatten(), dtype=np.float32)  # a writable copy
    return Embeddings(manifest, table.column("id").to_pylist(), np.array(table.column("label"), dtype=np.int64),
                      table.column("split").to_pylist(), flat.reshape(table.num_rows, int(manifest["dimension"])))
