"""`lejepa bench data`: the Ray Data pipeline against a torch DataLoader running the very same decode
and augmentation code (reader.train_blocks) with the same number of CPU processes, on the same
images, in one run.

Workloads: (a) the paper's views (2 x 224 + 6 x 96) of synthetic 256 px JPEGs written by the bench;
(b) the embedded dataset with the default recipe's views (4 x 32, no local views). Each pipeline
runs in its own child process. Throughput is the steady state: images delivered after the first
batch over the time since it; the first batch's latency (pipeline fill) is reported separately, as
is set-up (Ray: starting the cluster and its worker processes), both one-off costs of a run.
Peak memory (PSS summed over the child's process tree: for Ray that includes the raylet, GCS and
workers) is measured in a run of its own: sampling it reads every mapped page of every process,
which cost the Ray side (a 2 GB object store mapped in each worker) 10-15 % of its throughput.
"""

from __future__ import annotations

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
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

GOAL = 1.0
"""Ray Data images/s over DataLoader images/s wanted on the realistic workload (a)."""


def _processes() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _synthetic_jpegs(folder: Path, count: int, side: int = 256) -> None:
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


def _tree(root: int) -> list[int]:
    """`root` and its descendants, from /proc (just `root` where there is no /proc)."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else []:
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, frontier = [root], {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier}
        tree.extend(frontier)
    return tree


def _tree_pss() -> int:
    """Bytes of PSS summed over this process tree."""
    total = 0
    for pid in _tree(os.getpid()):
        try:
            lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        total += sum(int(line.split()[1]) * 1024 for line in lines if line.startswith("Pss:"))
    return total


def _tree_cpu() -> float:
    """CPU seconds (user + system, reaped children included) used so far by this process tree."""
    total = 0
    for pid in _tree(os.getpid()):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    return total / os.sysconf("SC_CLK_TCK")


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


def _warm_worker(batch: dict) -> dict:
    """Import the pipeline's code and hold the CPU briefly, so that every worker process is started."""
    import lejepa_platform.data.reader  # noqa: F401

    time.sleep(0.5)
    return batch


def _ray_batches(cfg, epochs: int, batch: int, procs: int, clock: dict) -> Iterator[dict]:
    import ray
    from ray.data import DataContext

    from lejepa_platform.data.pipeline import train_dataset

    ray.init(num_cpus=procs, include_dashboard=False, log_to_driver=False, object_store_memory=2 * 2**30)
    DataContext.get_current().enable_progress_bars = False
    DataContext.get_current().print_on_execution_start = False
    try:
        ray.data.range(procs, override_num_blocks=procs).map_batches(_warm_worker).materialize()
        clock.update(ready=time.perf_counter(), cpu=_tree_cpu())
        yield from train_dataset(cfg, seed=0, epochs=epochs).iter_torch_batches(batch_size=batch, drop_last=True)
        clock["cpu"] = _tree_cpu() - clock["cpu"]  # before shutdown, while the workers are there to count
    finally:
        ray.shutdown()


class _UnitStream(IterableDataset):
    """The same (epoch, unit) work items as the Ray pipeline; DataLoader worker k takes items k, k + n, ..."""

    def __init__(self, cfg, epochs: int) -> None:
        from lejepa_platform.data.reader import plan_source

        self.cfg, self.epochs = cfg, epochs
        self.plan = plan_source(cfg.source, cfg.split)

    def __iter__(self) -> Iterator[dict]:
        from lejepa_platform.data.reader import epoch_units, train_blocks

        info = get_worker_info()
        per_epoch = len(self.plan.units)
        for item in range(info.id, self.epochs * per_epoch, info.num_workers):
            epoch = item // per_epoch
            unit = epoch_units(self.plan, 0, epoch)[item % per_epoch]
            for block, _, _ in train_blocks(unit, self.plan, self.cfg, seed=0, epoch=epoch):
                if block is not None:
                    yield {k: torch.from_numpy(v) for k, v in block.items()}


def _loader_batches(cfg, epochs: int, batch: int, procs: int, clock: dict) -> Iterator[dict]:
    loader = DataLoader(_UnitStream(cfg, epochs), batch_size=None, num_workers=procs, prefetch_factor=4)
    clock.update(ready=time.perf_counter(), cpu=_tree_cpu())
    pending: list[dict] = []
    held = 0
    for block in loader:  # re-batch to `batch` rows, as iter_torch_batches does
        pending.append(block)
        held += len(block["label"])
        while held >= batch:
            merged = {k: torch.cat([p[k] for p in pending]) for k in block}
            yield {k: v[:batch] for k, v in merged.items()}
            pending = [{k: v[batch:] for k, v in merged.items()}]
            held -= batch
    clock["cpu"] = _tree_cpu() - clock["cpu"]  # the finished workers are reaped: their time is in ours


def _measure(spec: dict) -> dict:
    """Run one pipeline: throughput, or (spec["memory"]) peak memory. Set-up ends once the pipeline
    can start (Ray: cluster up, worker processes warm); the first batch's latency is counted from
    there; throughput from the first batch to the last. CPU time is summed over the whole process
    tree (Ray's raylet and GCS included) from the end of set-up to the last batch."""
    from lejepa_platform.config import DataConfig

    cfg = DataConfig(**spec["cfg"])
    memory = _PeakMemory() if spec["memory"] else None
    if memory:
        memory.start()
    launched = time.perf_counter()
    clock: dict[str, float] = {}
    source = _ray_batches if spec["pipeline"] == "ray" else _loader_batches
    images, first, first_images = 0, 0.0, 0
    for batch in source(cfg, spec["epochs"], spec["batch"], spec["procs"], clock):
        assert batch["global"].shape[1:] == (cfg.global_views, 3, cfg.global_size, cfg.global_size)
        images += len(batch["label"])
        if not first:
            first, first_images = time.perf_counter(), images
    end = time.perf_counter()
    if memory:
        return {"peak_mem_mb": round(memory.finish() / 2**20)}
    return {"images": images, "images_per_s": round((images - first_images) / (end - first), 1),
            "cpu_ms_per_image": round(1000 * clock["cpu"] / images, 2),
            "setup_s": round(clock["ready"] - launched, 2), "first_batch_s": round(first - clock["ready"], 2)}


# --------------------------------------------------------------------------------------------
# Parent side.


def _child(spec: dict) -> dict:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-m", "lejepa_platform.bench.data", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench child {spec['pipeline']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _compare(name: str, views: str, cfg: dict, epochs: int, batch: int, procs: int, rounds: int) -> dict:
    """Throughput runs of each pipeline `rounds` times in ABBA order (a drift in machine load
    cancels; means reported), then one memory run of each."""
    print(f"bench data: {name} ({views}), {procs} processes each", file=sys.stderr)
    spec = {"cfg": cfg, "epochs": epochs, "batch": batch, "procs": procs, "memory": False}
    order = ["ray", "dataloader", "dataloader", "ray"] * (rounds // 2) + ["ray", "dataloader"] * (rounds % 2)
    runs: dict[str, list[dict]] = {"ray": [], "dataloader": []}
    for pipeline in order:
        runs[pipeline].append(_child({**spec, "pipeline": pipeline}))
    memory = {pipeline: _child({**spec, "pipeline": pipeline, "memory": True}) for pipeline in runs}
    summary = {}
    for pipeline, results in runs.items():
        summary[pipeline] = {
            "images": results[0]["images"],
            "images_per_s": round(float(np.mean([r["images_per_s"] for r in results])), 1),
            "each_run_images_per_s": [r["images_per_s"] for r in results],
            "cpu_ms_per_image": round(float(np.mean([r["cpu_ms_per_image"] for r in results])), 2),
            "setup_s": max(r["setup_s"] for r in results),
            "first_batch_s": max(r["first_batch_s"] for r in results),
            **memory[pipeline]}
    ray, loader = summary["ray"], summary["dataloader"]
    ratio = ray["images_per_s"] / max(loader["images_per_s"], 1e-9)
    print(f"bench data: {name}: ray {ray['images_per_s']} img/s, dataloader {loader['images_per_s']} img/s, "
          f"ratio {ratio:.2f}", file=sys.stderr)
    return {"views": views, "epochs": epochs, "batch": batch, **summary, "ratio": round(ratio, 3),
            "cpu_ratio": round(loader["cpu_ms_per_image"] / max(ray["cpu_ms_per_image"], 1e-9), 3)}


def run(quick: bool = False) -> dict:
    """Both workloads, Ray Data vs DataLoader; JSON-ready. ratio: images/s of Ray over the
    DataLoader's; cpu_ratio: the DataLoader's CPU time per image over Ray's (> 1: Ray spends less)."""
    from lejepa_platform.data.shards import build_shards

    procs = _processes()
    count = 256 if quick else 2048
    rounds = 1 if quick else 2
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="lejepa-bench-data-") as tmp:
        _synthetic_jpegs(Path(tmp) / "jpegs", count)
        build_shards(str(Path(tmp) / "jpegs"), str(Path(tmp) / "shards"), rows_per_shard=256)
        paper = dict(source=str(Path(tmp) / "shards"), split="all", global_views=2, global_size=224,
                     local_views=6, local_size=96)
        small = dict(global_views=4, global_size=32, local_views=0)
        results = {
            "a_paper_views_256px_jpeg": _compare("a", "2 x 224 + 6 x 96", paper, 1, 64, procs, rounds),
            "b_builtin_4x32": _compare("b", "4 x 32, no local", small, 1 if quick else 4, 256, procs, rounds),
        }
    ratio = results["a_paper_views_256px_jpeg"]["ratio"]
    return {"processes": procs, "load_average_1m": [round(load, 2), round(os.getloadavg()[0], 2)], "quick": quick,
            "images_a": count, "workloads": results, "goal": f"ratio >= {GOAL} on (a)", "goal_met": ratio >= GOAL}


if __name__ == "__main__":
    print(json.dumps(_measure(json.loads(sys.argv[1]))))
