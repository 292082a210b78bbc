"""`lejepa bench embed`: images/s of `lejepa embed` on CPU against the in-process feature extraction
`lejepa eval` does (`load_eval_set` + `extract_features`: one process, all its threads), on the
same images with the same backbone and features.

The backbone is the embedded default's (a small ViT at 32 px) at random initialisation, saved as a
checkpoint: speed does not depend on the weights. The images are the embedded Fashion-MNIST
shard's (the first `images` of them). `lejepa embed` reads, decodes, embeds in its actor pool and
writes Parquet with its write checkpoint; the baseline only holds the features in memory. Ray is
started before the timed runs (`setup_s`); the two alternate `repeats` times, images/s over the
median seconds.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import ray
import torch

from lejepa_platform.console import say
from lejepa_platform.data.evalset import load_eval_set
from lejepa_platform.data.ray_units import join_ray
from lejepa_platform.data.reader import plan_source
from lejepa_platform.data.shards import build_shards, resolve_source
from lejepa_platform.defaults import default_run_config
from lejepa_platform.eval.features import extract_features
from lejepa_platform.eval.report import load_encoder
from lejepa_platform.model import build_encoder
from lejepa_platform.run.embed import MIN_LOCAL_CPUS, embed
from lejepa_platform.train.checkpoint import TrainState, save_checkpoint


def _source(folder: Path, images: int) -> str:
    """Shards of the first `images` images of the embedded dataset."""
    table = pq.read_table(resolve_source("builtin:fashion-mnist-10k") / "part-00000.parquet").slice(0, images)
    pngs = folder / "pngs"
    pngs.mkdir(parents=True)
    for i, png in enumerate(table.column("image").to_pylist()):
        (pngs / f"{i:05d}.png").write_bytes(png)
    build_shards(str(pngs), str(folder / "shards"), quiet=True)
    return str(folder / "shards")


def run(quick: bool = False) -> dict[str, Any]:
    images, repeats = (256, 1) if quick else (5000, 3)
    cfg = default_run_config()
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model)
    size = cfg.eval.eval_size or cfg.data.global_size
    seconds: dict[str, list[float]] = {"in_process": [], "embed": []}
    with tempfile.TemporaryDirectory(prefix="lejepa-bench-embed-") as tmp:
        source = _source(Path(tmp), images)
        checkpoint = save_checkpoint(Path(tmp) / "checkpoint",
                                     TrainState({f"encoder.{k}": v for k, v in encoder.state_dict().items()}, {}, 0,
                                                {}), cfg)
        started = time.perf_counter()
        join_ray("local", min_cpus=MIN_LOCAL_CPUS)
        setup_s = time.perf_counter() - started
        for repeat in range(repeats):
            say(False, f"bench embed: run {repeat + 1} of {repeats} ({images} images)")
            started = time.perf_counter()
            evalset = load_eval_set(plan_source(source, "all"), size)
            extract_features(load_encoder(cfg.model, encoder.state_dict()), evalset.images, features=cfg.eval.features)
            seconds["in_process"].append(time.perf_counter() - started)
            started = time.perf_counter()
            summary = embed(str(checkpoint), data=source, out=str(Path(tmp) / f"emb-{repeat}"), quiet=True)
            seconds["embed"].append(time.perf_counter() - started)
        cpus = int(ray.cluster_resources().get("CPU", 0))
        ray.shutdown()
    rates = {name: images / statistics.median(times) for name, times in seconds.items()}
    return {
        "bench": "embed",
        "workload": {"images": images, "backbone": cfg.model.backbone, "image_size": size,
                     "features": cfg.eval.features, "dimension": summary["dimension"], "repeats": repeats},
        "cpus": {"machine": os.cpu_count(), "ray_cluster": cpus, "torch_threads": torch.get_num_threads()},
        "in_process": {"seconds": [round(s, 3) for s in seconds["in_process"]],
                       "images_per_s": round(rates["in_process"], 1)},
        "embed": {"seconds": [round(s, 3) for s in seconds["embed"]], "images_per_s": round(rates["embed"], 1),
                  "setup_s": round(setup_s, 3)},
        "ratio": round(rates["embed"] / rates["in_process"], 3),
    }
