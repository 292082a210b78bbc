"""`lejepa embed`: a run's frozen backbone over a whole image collection, on Ray Data.

The plan: the source's units read by Ray Data read tasks (data/embeddings.py `raw_rows`), each
image turned into its evaluation view by Ray Data tasks (`view_batch`: the decoding and centre
crop of `lejepa eval`), the backbone in an autoscaling Ray Data actor pool (`Embedder`, 1 to
`actors` actors, one GPU each with `gpus`) reading the features `lejepa eval` reads
(eval/features.py), the rows regrouped into blocks of `rows_per_file` (Ray Data's streaming
repartition) and each block written as one Parquet file under OUT/data by Ray Data's Parquet writer.

Exactly once: the dataset carries Ray Data's write checkpoint (`ray.data.checkpoint.CheckpointConfig`
on the `id` column, under OUT/.checkpoint). Each write task records the ids it is about to write as
pending, writes its file, then commits the ids; a re-run of the same job first deletes the files of
pending (uncommitted) writes and then reads past every committed id. So a job killed at any point
and run again writes every id exactly once. The manifest is written last, once the data is all
there (data/embeddings.py), and the checkpoint is removed after it: a job killed between the two
re-runs to nothing new.

Ray's checkpoint filter runs as an actor of 1 CPU on a resumed job, next to the embedding actors and
the read, decode and write tasks: a local cluster started here offers at least MIN_LOCAL_CPUS, and
the default pool leaves two CPUs of the cluster to the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from ray.data.checkpoint import CheckpointConfig

from lejepa_platform import __version__
from lejepa_platform.config import EVAL_FEATURES, DataConfig, ModelConfig, RunConfig
from lejepa_platform.console import say
from lejepa_platform.data.embeddings import (CHECKPOINT_DIR, DATA_DIR, FORMAT, EmbeddingsDir, embedding_table, place,
                                             raw_rows, view_batch)
from lejepa_platform.data.ray_units import join_ray, read_units
from lejepa_platform.data.reader import Plan, plan_source
from lejepa_platform.data.sources import open_source
from lejepa_platform.errors import UserError
from lejepa_platform.eval.features import extract_features, weights_digest
from lejepa_platform.eval.report import load_encoder
from lejepa_platform.run.evaluate import load_target
from lejepa_platform.tracking import resolve_tracking_uri

BATCH_SIZE = 256
"""Images per batch an embedding actor runs (the batch `lejepa eval` embeds with)."""
ROWS_PER_FILE = 4096
"""Rows per written Parquet file (the last ones of a job may hold fewer): the most work a killed job
loses per write task."""
MIN_LOCAL_CPUS = 3
"""CPUs a local cluster started by `lejepa embed` offers at least: an embedding actor, Ray's
checkpoint filter actor on a resumed job, and the tasks that read, decode and write."""
MAX_PIXELS = DataConfig().max_image_pixels
"""Images claiming more pixels are skipped, as `lejepa eval` skips them."""
PROGRESS_EVERY_S = 15.0


def embed(target: str, *, data: str, out: str, features: str | None = None, gpus: int = 0, actors: int = 0,
          batch_size: int = BATCH_SIZE, rows_per_file: int = ROWS_PER_FILE, tracking_uri: str | None = None,
          address: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """Embed every image of `data` with the backbone of `target` (run id, run or checkpoint directory)
    into `out` (see the module doc); JSON-ready summary. A finished `out` of the same job is left as
    it is; an unfinished one is continued. gpus: one GPU per actor, up to `gpus` actors; actors: up to
    this many CPU actors (0: the cluster's CPUs less two). address: the Ray cluster (None: a local one)."""
    started = time.perf_counter()
    _check_sizes(gpus, actors, batch_size, rows_per_file)
    if features is not None and features not in EVAL_FEATURES:
        raise UserError(f"--features {features!r} is not allowed: one of {', '.join(EVAL_FEATURES)}")
    plan = plan_source(data, "all")
    folder = EmbeddingsDir(out)
    cfg, weights, run_id = load_target(target, resolve_tracking_uri(tracking_uri or ""))
    spec = _Spec.of(cfg, weights, features or cfg.eval.features, data)
    state = folder.state(spec.job)
    if state == "done":
        return _summary(out, folder.manifest(), "unchanged", started)
    if state == "new":
        folder.start(spec.job)
    try:
        join_ray(address or "local", min_cpus=MIN_LOCAL_CPUS)
        pool = _pool(gpus, actors)
        say(quiet, f"embed: {plan.rows} images of {data} with {cfg.model.backbone} ({spec.features}, "
                   f"{spec.dimension} dims) on up to {pool[0]} {'GPU' if gpus else 'CPU'} actors into {out}")
        with _progress(folder, plan.rows, quiet):
            _write(plan, data, folder, spec, pool, batch_size, rows_per_file)
        manifest = _manifest(folder, spec, target, run_id, plan, data)
    except UserError:
        if state == "new":
            folder.remove()
        raise
    folder.finish(manifest)
    say(quiet, f"embed: wrote {manifest['count']} embeddings ({manifest['skipped']} images skipped) to {out}")
    return _summary(out, manifest, "resumed" if state == "resume" else "built", started)


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What a job computes: the model and its backbone weights, the features and their size, the view
    size, the source, and the digest naming the job (weights, features, source and view)."""

    model: ModelConfig
    backbone: dict
    embed_dim: int
    features: str
    dimension: int
    size: int
    seed: int
    source: dict
    job: dict

    @classmethod
    def of(cls, cfg: RunConfig, weights: dict, features: str, data: str) -> _Spec:
        encoder = load_encoder(cfg.model, weights, cfg.train.seed)  # UserError when the weights do not fit
        size = cfg.eval.eval_size or cfg.data.global_size
        probe = extract_features(encoder, np.zeros((1, 3, size, size), np.uint8), features=features)
        src = open_source(data)
        identity = {"backbone_sha256": weights_digest(encoder.backbone), "features": features,
                    "source": src.fingerprint(), "image_size": size, "max_pixels": MAX_PIXELS}
        job = {"format": FORMAT, "job": hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest(),
               "backbone_sha256": identity["backbone_sha256"]}
        return cls(cfg.model, encoder.backbone.state_dict(), encoder.embed_dim, features, int(probe.shape[1]), size,
                   cfg.train.seed, src.describe(), job)


class Embedder:
    """One actor of the pool: the frozen backbone (on the actor's GPU when it has one), reading the
    features `lejepa eval` reads from batches of evaluation views."""

    def __init__(self, model: ModelConfig, backbone: dict, features: str, seed: int) -> None:
        self.device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.encoder = load_encoder(model, backbone, seed).to(self.device)
        self.features = features

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        views = batch["view"]
        feats = extract_features(self.encoder, views, features=self.features, batch_size=max(1, len(views)),
                                 device=self.device)
        return embedding_table(batch, feats.numpy())


def _write(plan: Plan, data: str, folder: EmbeddingsDir, spec: _Spec, pool: tuple[int, int], batch_size: int,
           rows_per_file: int) -> None:
    """The Ray Data job: read, view, embed, write, with Ray Data's write checkpoint on `id`."""
    rows = read_units(plan, functools.partial(raw_rows, placement=place(plan)))
    views = rows.map_batches(view_batch, fn_kwargs={"size": spec.size, "max_pixels": MAX_PIXELS},
                             batch_format="numpy")
    embedded = views.map_batches(Embedder, fn_constructor_args=(spec.model, spec.backbone, spec.features, spec.seed),
                                 batch_size=batch_size, batch_format="numpy",
                                 compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool[0]),
                                 **({"num_gpus": 1} if pool[1] else {"num_cpus": 1}))
    files = embedded.repartition(target_num_rows_per_block=rows_per_file)  # streaming: one file per block
    files.context.checkpoint_config = CheckpointConfig(
        id_column="id", checkpoint_path=folder.path(CHECKPOINT_DIR), delete_checkpoint_on_success=False,
        override_filesystem=folder.filesystem)
    files.write_parquet(folder.path(DATA_DIR), filesystem=folder.filesystem, min_rows_per_file=rows_per_file)


def _pool(gpus: int, actors: int) -> tuple[int, int]:
    """(most actors, GPUs per actor): one GPU each with --gpus, else CPU actors leaving two CPUs free."""
    if gpus:
        return gpus, 1
    return actors or max(1, int(ray.cluster_resources().get("CPU", 1)) - 2), 0


def _manifest(folder: EmbeddingsDir, spec: _Spec, target: str, run_id: str | None, plan: Plan, data: str) -> dict:
    """The manifest of the finished data; UserError when no image could be embedded."""
    files = folder.data_files()
    labels = (np.concatenate([pq.read_table(f"{folder.root}/{f}", columns=["label"], filesystem=folder.filesystem)
                              .column("label").to_numpy() for f in files]) if files else np.zeros(0, np.int64))
    if labels.size == 0:
        raise UserError(f"no readable images in {data!r} ({plan.rows} records, none could be decoded)")
    return {**spec.job, "run": target, "run_id": run_id, "backbone": spec.model.backbone, "features": spec.features,
            "embed_dim": spec.embed_dim, "dimension": spec.dimension, "image_size": [spec.size, spec.size],
            "seed": spec.seed, "source": spec.source,
            "split": "own" if plan.split_spec is not None else "seeded", "count": int(labels.size),
            "labelled": int((labels >= 0).sum()), "skipped": plan.rows - int(labels.size), "files": files,
            "tool": f"lejepa_platform {__version__}"}


@contextlib.contextmanager
def _progress(folder: EmbeddingsDir, total: int, quiet: bool) -> Iterator[None]:
    """Say every PROGRESS_EVERY_S how many embeddings are written (from the files' footers)."""
    stop = threading.Event()

    def tell() -> None:
        while not stop.wait(PROGRESS_EVERY_S):
            say(quiet, f"embed: {folder.written_rows()} of {total} images written")

    thread = threading.Thread(target=tell, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _check_sizes(gpus: int, actors: int, batch_size: int, rows_per_file: int) -> None:
    for name, value, least in (("--gpus", gpus, 0), ("--actors", actors, 0), ("--batch-size", batch_size, 1),
                               ("--rows-per-file", rows_per_file, 1)):
        if value < least:
            raise UserError(f"{name} {value} is not allowed: must be >= {least}")
    if gpus and actors:
        raise UserError("--actors and --gpus exclude each other: with --gpus the pool has up to one actor per GPU")


def _summary(out: str, manifest: dict, status: str, started: float) -> dict[str, Any]:
    keys = ("run", "backbone", "features", "dimension", "count", "labelled", "skipped", "split")
    return {"out": out, "status": status, **{k: manifest[k] for k in keys}, "files": len(manifest["files"]),
            "seconds": round(time.perf_counter() - started, 3)}

