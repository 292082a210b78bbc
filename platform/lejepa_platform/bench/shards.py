"""`lejepa bench shards`: images/s of `lejepa shards build` on Ray Data against today's
single-process build (a thread pool in one process), on the same source, in one run.

The source is synthetic 256 px JPEGs (bench/data.py), stored as JPEG shards at most MAX_SIDE px on
the longer side, so every record is decoded, resized and encoded again: the per-record conversion
both builds share (data/shards/convert.py), the work a cluster spreads out. Ray is started before
the timed builds, and an untimed build of a few images starts its worker processes (together
`setup_s`, a one-off cost of a job); the two builds then alternate
`repeats` times and images/s is the source's records over the median seconds. On one machine the
Ray build runs on that machine's cores too: the ratio says what its tasks and writes cost against
the thread pool; across a cluster the Ray build adds the other nodes' cores.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from lejepa_platform.bench.data import synthetic_jpegs
from lejepa_platform.console import say
from lejepa_platform.data.ray_units import join_ray
from lejepa_platform.data.shards import build_shards

MAX_SIDE = 128
ROWS_PER_SHARD = 512
WARM_UP_IMAGES = 16
"""Images of an untimed Ray build after Ray starts: its worker processes start and import here."""


def run(quick: bool = False) -> dict[str, Any]:
    images, repeats = (96, 1) if quick else (2000, 3)
    seconds: dict[str, list[float]] = {"single_process": [], "ray_data": []}
    with tempfile.TemporaryDirectory(prefix="lejepa-bench-shards-") as tmp:
        source = Path(tmp) / "source"
        synthetic_jpegs(source, images)
        synthetic_jpegs(Path(tmp) / "warm-up", WARM_UP_IMAGES)
        started = time.perf_counter()
        join_ray("local")
        build_shards(str(Path(tmp) / "warm-up"), str(Path(tmp) / "warm-up-shards"), quiet=True, address="local")
        setup_s = time.perf_counter() - started
        for repeat in range(repeats):
            for name, address in (("single_process", None), ("ray_data", "local")):
                say(False, f"bench shards: {name} build {repeat + 1} of {repeats} ({images} images)")
                started = time.perf_counter()
                build_shards(str(source), str(Path(tmp) / f"{name}-{repeat}"), image_format="jpeg",
                             max_side=MAX_SIDE, rows_per_shard=ROWS_PER_SHARD, quiet=True, address=address)
                seconds[name].append(time.perf_counter() - started)
        cpus = int(ray.cluster_resources().get("CPU", 0))
        ray.shutdown()
    rates = {name: images / statistics.median(times) for name, times in seconds.items()}
    return {
        "bench": "shards",
        "workload": {"images": images, "source": "synthetic 256 px JPEGs", "format": "jpeg", "max_side": MAX_SIDE,
                     "rows_per_shard": ROWS_PER_SHARD, "repeats": repeats},
        "cpus": {"machine": os.cpu_count(), "ray_cluster": cpus},
        "single_process": {"seconds": [round(s, 3) for s in seconds["single_process"]],
                           "images_per_s": round(rates["single_process"], 1)},
        "ray_data": {"seconds": [round(s, 3) for s in seconds["ray_data"]], "images_per_s": round(rates["ray_data"], 1),
                     "setup_s": round(setup_s, 3)},
        "ratio": round(rates["ray_data"] / rates["single_process"], 3),
    }
