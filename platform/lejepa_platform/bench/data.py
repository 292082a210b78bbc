"""`lejepa bench data`: the platform's data tasks (`pipeline.rank_batches`) against a torch DataLoader
running the very same decode and augmentation code (stream.item_blocks) with the same number of CPU
processes, on the same images, in one run.

Workloads: (a) the paper's views (2 x 224 + 6 x 96) of synthetic 256 px JPEGs written by the bench;
(b) the embedded dataset with the default recipe's views (4 x 32, no local views). Each pipeline
runs in its own child process. Throughput is the steady state: images delivered after the first
batch over the time since it; the first batch's latency (pipeline fill) is reported separately, as
is set-up (Ray: starting the cluster and its worker processes), both one-off costs of a run.
Peak memory (PSS summed over the child's process tree: for Ray that includes the raylet, GCS and
workers) is measured in a run of its own: sampling it reads every mapped page of every process,
which cost the Ray side (a 2 GB object store mapped in each worker) 10-15 % of its throughput.

Placement (data.augment_on): the Ray side also runs with the photometric half left to the trainer
(`ray_device`: decode and geometric crops only, the params shipped with the rows). Its data-side
cost is measured as above; the trainer's share, `views.augment_views` on delivered batches, is
timed on the device a trainer here would use, so both placements' cost per image is in one run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lejepa_platform.config import DataConfig
from lejepa_platform.console import say

GOAL = 1.0
"""Ray images/s over DataLoader images/s wanted on the realistic workload (a)."""
PLACEMENT_GOAL = 0.25
"""Data-side CPU per image with device placement over that with data placement, wanted on (a)."""
TRAINER_BATCHES = 3
"""Delivered batches the trainer's photometric half is timed on (device placement)."""


def _processes() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def synthetic_jpegs(folder: Path, count: int, side: int = 256) -> None:
    """Smooth colour fields with shapes and grain: compresses like a photo (about 20-40 KB at q90)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(count):
        low = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        image = Image.fromarray(low).resize((side, side), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.integers(0, side, 2)
            r = int(rng.integers(8, side // 3))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        pixels = np.asarray(image).astype(np.int16) + rng.normal(0, 6, (side, side, 3)).astype(np.int16)
        out = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
        (folder / f"img{i:05d}.jpg").write_bytes(out.getvalue())


# --------------------------------------------------------------------------------------------
# Child side: one pipeline, measured.


def process_tree(root: int) -> list[int]:
    """`root` and its descendants (those still alive)."""
    try:
        return [root, *(child.pid for child in psutil.Process(root).children(recursive=True))]
    except psutil.NoSuchProcess:
        return [root]


def _each_process(pids: list[int]) -> Iterator[psutil.Process]:
    for pid in pids:
        try:
            yield psutil.Process(pid)
        except psutil.NoSuchProcess:
            continue


def _tree_pss() -> int:
    """Bytes of PSS summed over this process tree (USS where the system has no PSS, e.g. macOS)."""
    total = 0
    for process in _each_process(process_tree(os.getpid())):
        with contextlib.suppress(psutil.Error):
            memory = process.memory_full_info()
            total += getattr(memory, "pss", memory.uss)
    return total


def _tree_cpu() -> float:
    """CPU seconds (user + system, reaped children included) used so far by this process tree."""
    total = 0.0
    for process in _each_process(process_tree(os.getpid())):
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


class _PeakMemory(threading.Thread):
    """Samples the summed PSS of this process tree."""

    def __init__(self, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self._halt = interval, 0, threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, _tree_pss())
            self._halt.wait(self.interval)

    def finish(self) -> int:
        self._halt.set()
        self.join()
        return max(self.peak, _tree_pss())


def _warm_worker() -> None:
    """Import the pipeline's code and hold the CPU briefly, so that every worker process is started."""
    import lejepa_platform.data.reader  # noqa: F401

    time.sleep(0.5)


def _ray_batches(cfg, epochs: int, batch: int, procs: int, clock: dict, photometric: bool) -> Iterator[dict]:
    import ray

    from lejepa_platform.data.pipeline import rank_batches
    from lejepa_platform.data.reader import plan_source

    ray.init(num_cpus=procs, include_dashboard=False, log_to_driver=False, object_store_memory=2 * 2**30)
    try:
        warm = ray.remote(_warm_worker)
        ray.get([warm.remote() for _ in range(procs)])
        clock.update(ready=time.perf_counter(), cpu=_tree_cpu())
        yield from rank_batches(plan_source(cfg.source, cfg.split), cfg, seed=0, epochs=epochs, batch_rows=batch,
                                photometric=photometric)
        clock["cpu"] = _tree_cpu() - clock["cpu"]  # before shutdown, while the workers are there to count
    finally:
        ray.shutdown()


class _UnitStream(IterableDataset):
    """The same work items as the Ray pipeline (data/stream.py); DataLoader worker k takes items k, k + n, ..."""

    def __init__(self, cfg, epochs: int, photometric: bool) -> None:
        from lejepa_platform.data.reader import plan_source

        self.cfg, self.epochs, self.photometric = cfg, epochs, photometric
        self.plan = plan_source(cfg.source, cfg.split)

    def __iter__(self) -> Iterator[dict]:
        from lejepa_platform.data.stream import item_blocks, windows_per_epoch

        info = get_worker_info()
        for item in range(info.id, self.epochs * windows_per_epoch(self.plan, self.cfg), info.num_workers):
            for block, _, _ in item_blocks(self.plan, self.cfg, seed=0, index=item, photometric=self.photometric):
                if block is not None:
                    yield block


def loader_batches(cfg: DataConfig, epochs: int, batch: int, procs: int, clock: dict,
                   photometric: bool) -> Iterator[dict]:
    """The baseline's stream: a DataLoader of `procs` workers over the platform's work items
    (`_UnitStream`), rebatched to `batch` rows; `clock` gets the start time and CPU used."""
    from lejepa_platform.data.pipeline import rebatch

    loader = DataLoader(_UnitStream(cfg, epochs, photometric), batch_size=None, num_workers=procs, prefetch_factor=4)
    clock.update(ready=time.perf_counter(), cpu=_tree_cpu())
    yield from rebatch(({k: v.numpy() for k, v in block.items()} for block in loader), batch)
    clock["cpu"] = _tree_cpu() - clock["cpu"]  # the finished workers are reaped: their time is in ours


def _trainer_photometric(batches: list[dict], cfg) -> dict:
    """The trainer's share of device placement: `augment_views` on delivered batches, after one
    warm-up call, on the device a trainer here would use. CUDA when present (wall time, synchronised);
    else this CPU with one torch thread, counting the CPU time it takes (core-milliseconds, as the
    data side is counted; a busy machine does not inflate it). The host-to-device copy is not timed:
    the trainer makes it in either placement."""
    from lejepa_platform.data.views import augment_views

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    if device.type == "cpu":
        torch.set_num_threads(1)
    on_device = [{k: v.to(device) for k, v in batch.items()} for batch in batches]
    augment_views(on_device[0], cfg)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    for batch in on_device:
        augment_views(batch, cfg)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    images = sum(len(batch["global"]) for batch in on_device)
    return {"trainer_device": device.type,
            "trainer_photometric_ms_per_image": round(1000 * (clock() - start) / images, 3)}


def _measure(spec: dict) -> dict:
    """Run one pipeline: throughput, or (spec["memory"]) peak memory. Set-up ends once the pipeline
    can start (Ray: cluster up, worker processes warm); the first batch's latency is counted from
    there; throughput from the first batch to the last. CPU time is summed over the whole process
    tree (Ray's raylet and GCS included) from the end of set-up to the last batch. Bytes per image:
    every column of the delivered rows (for Ray, what its blocks hold in the object store). With
    device placement the trainer's photometric half is timed after the stream has ended."""
    from lejepa_platform.config import DataConfig

    cfg = DataConfig(**spec["cfg"])
    photometric = spec["placement"] == "data"
    memory = _PeakMemory() if spec["memory"] else None
    if memory:
        memory.start()
    launched = time.perf_counter()
    clock: dict[str, float] = {}
    source = _ray_batches if spec["pipeline"] == "ray" else loader_batches
    images, first, first_images, shipped = 0, 0.0, 0, 0
    kept: list[dict] = []
    for batch in source(cfg, spec["epochs"], spec["batch"], spec["procs"], clock, photometric):
        assert batch["global"].shape[1:] == (cfg.global_views, 3, cfg.global_size, cfg.global_size)
        assert ("global_params" in batch) is not photometric
        images += len(batch["label"])
        shipped += sum(column.nbytes for column in batch.values())
        if not photometric and len(kept) < TRAINER_BATCHES:
            kept.append(batch)
        if not first:
            first, first_images = time.perf_counter(), images
    end = time.perf_counter()
    if memory:
        return {"peak_mem_mb": round(memory.finish() / 2**20)}
    return {"images": images, "images_per_s": round((images - first_images) / (end - first), 1),
            "cpu_ms_per_image": round(1000 * clock["cpu"] / images, 2), "bytes_per_image": round(shipped / images),
            "setup_s": round(clock["ready"] - launched, 2), "first_batch_s": round(first - clock["ready"], 2),
            **(_trainer_photometric(kept, cfg) if kept else {})}


# --------------------------------------------------------------------------------------------
# Parent side.


def _child(spec: dict) -> dict:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-m", "lejepa_platform.bench.data", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench child {spec['pipeline']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


RUNS = {"ray": ("ray", "data"), "dataloader": ("dataloader", "data"), "ray_device": ("ray", "device")}
"""Each measured run: (pipeline, placement of the photometric half)."""


def _placement(run: dict) -> dict:
    """One placement's costs. CPU cores per 1,000 images/s: data-side CPU ms per image, plus the
    trainer's photometric ms when its device is this CPU (then it costs CPU too)."""
    trainer_ms = run.get("trainer_photometric_ms_per_image", 0.0)
    on_cpu = run.get("trainer_device", "cpu") == "cpu"
    return {"images_per_s": run["images_per_s"], "data_cpu_ms_per_image": run["cpu_ms_per_image"],
            "object_store_bytes_per_image": run["bytes_per_image"],
            "trainer_photometric_ms_per_image": trainer_ms, "trainer_device": run.get("trainer_device"),
            "cpu_cores_per_1000_images_per_s": round(run["cpu_ms_per_image"] + (trainer_ms if on_cpu else 0.0), 2)}


def _compare(name: str, views: str, cfg: dict, epochs: int, batch: int, procs: int, rounds: int) -> dict:
    """Throughput runs of each of RUNS `rounds` times in ABBA order (a drift in machine load
    cancels; means reported), then one memory run of each."""
    say(False, f"bench data: {name} ({views}), {procs} processes each")
    spec = {"cfg": cfg, "epochs": epochs, "batch": batch, "procs": procs, "memory": False}
    names = list(RUNS)
    order = (names + names[::-1]) * (rounds // 2) + names * (rounds % 2)
    runs: dict[str, list[dict]] = {run: [] for run in names}

    def child(run: str, memory: bool) -> dict:
        pipeline, placement = RUNS[run]
        return _child({**spec, "pipeline": pipeline, "placement": placement, "memory": memory})

    for run in order:
        runs[run].append(child(run, False))
    memory = {run: child(run, True) for run in names}
    summary = {}
    for run, results in runs.items():
        trainer = {"trainer_device": results[0]["trainer_device"]} if "trainer_device" in results[0] else {}
        if trainer:
            trainer["trainer_photometric_ms_per_image"] = round(
                float(np.mean([r["trainer_photometric_ms_per_image"] for r in results])), 3)
        summary[run] = {
            "images": results[0]["images"],
            "images_per_s": round(float(np.mean([r["images_per_s"] for r in results])), 1),
            "each_run_images_per_s": [r["images_per_s"] for r in results],
            "cpu_ms_per_image": round(float(np.mean([r["cpu_ms_per_image"] for r in results])), 2),
            "bytes_per_image": results[0]["bytes_per_image"],
            "setup_s": max(r["setup_s"] for r in results),
            "first_batch_s": max(r["first_batch_s"] for r in results),
            **trainer, **memory[run]}
    ray, loader = summary["ray"], summary["dataloader"]
    ratio = ray["images_per_s"] / max(loader["images_per_s"], 1e-9)
    placement = {"data": _placement(ray), "device": _placement(summary["ray_device"])}
    cpu_share = placement["device"]["data_cpu_ms_per_image"] / max(placement["data"]["data_cpu_ms_per_image"], 1e-9)
    say(False, f"bench data: {name}: ray {ray['images_per_s']} img/s, dataloader {loader['images_per_s']} img/s, "
               f"ratio {ratio:.2f}; data-side CPU per image with device placement {cpu_share:.2f}x the data "
               f"placement's")
    return {"views": views, "epochs": epochs, "batch": batch, **summary, "ratio": round(ratio, 3),
            "cpu_ratio": round(loader["cpu_ms_per_image"] / max(ray["cpu_ms_per_image"], 1e-9), 3),
            "placement": {**placement, "data_cpu_device_over_data": round(cpu_share, 3)}}


def run(quick: bool = False) -> dict:
    """Both workloads, Ray vs DataLoader and data vs device placement; JSON-ready. ratio:
    images/s of Ray over the DataLoader's; cpu_ratio: the DataLoader's CPU time per image over
    Ray's (> 1: Ray spends less); placement.data_cpu_device_over_data: Ray's data-side CPU time per
    image with the photometric half on the trainer's device over that with it in the data tasks."""
    from lejepa_platform.data.shards import build_shards

    procs = _processes()
    count = 256 if quick else 2048
    rounds = 1 if quick else 2
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="lejepa-bench-data-") as tmp:
        synthetic_jpegs(Path(tmp) / "jpegs", count)
        build_shards(str(Path(tmp) / "jpegs"), str(Path(tmp) / "shards"), rows_per_shard=256)
        paper = dict(source=str(Path(tmp) / "shards"), split="all", global_views=2, global_size=224,
                     local_views=6, local_size=96)
        small = dict(global_views=4, global_size=32, local_views=0)
        results = {
            "a_paper_views_256px_jpeg": _compare("a", "2 x 224 + 6 x 96", paper, 1, 64, procs, rounds),
            "b_builtin_4x32": _compare("b", "4 x 32, no local", small, 1 if quick else 4, 256, procs, rounds),
        }
    ratio = results["a_paper_views_256px_jpeg"]["ratio"]
    cpu_share = results["a_paper_views_256px_jpeg"]["placement"]["data_cpu_device_over_data"]
    return {"processes": procs, "load_average_1m": [round(load, 2), round(os.getloadavg()[0], 2)], "quick": quick,
            "images_a": count, "workloads": results, "goal": f"ratio >= {GOAL} on (a)", "goal_met": ratio >= GOAL,
            "placement_goal": f"data-side CPU per image, device over data placement, <= {PLACEMENT_GOAL} on (a)",
            "placement_goal_met": cpu_share <= PLACEMENT_GOAL}


if __name__ == "__main__":
    print(json.dumps(_measure(json.loads(sys.argv[1]))))
