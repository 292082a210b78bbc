"""`lejepa bench step`: steady-state training throughput of the Ray Train path against a plain
single-process PyTorch loop doing identical work, in one run.

Both sides train the embedded default's model with the same `train_step` on the same in-memory
uint8 views (made from a seed, so augmentation cost is out of the picture): both sides slice batches
from one tensor of them, the Ray side inside one TorchTrainer worker (the views reach it through the
object store) that reports metrics like a real run. Warm-up steps are
excluded; the ratio ray / plain is what Ray Train costs per step.

The plain loop runs in a fresh process with the job's environment variables (`ray_env.job_env_vars`)
and so at the same niceness as the Ray worker: libgomp reads GOMP_SPINCOUNT once, when it loads, and
a driver-side plain loop (libgomp's default spin, the driver's niceness) differed from the worker in
both. Both sides report these settings. The plain loop runs before and after the Ray side and the
ratio uses their mean: on a 2-core VM one plain run alone varied from 419 to 547 img/s between
invocations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from lejepa_platform.config import RunConfig, to_dict
from lejepa_platform.overrides import from_dict, set_values
from lejepa_platform.defaults import default_run_config
from lejepa_platform.ray_env import JOB_ENV_VARS, init_ray, job_env_vars

WARMUP = 5


def _views(cfg: RunConfig, batches: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    d = cfg.data
    return rng.integers(0, 256, size=(batches * d.batch_size, d.global_views, 3, d.global_size, d.global_size),
                        dtype=np.uint8)


def timed_train_steps(cfg: RunConfig, batches: Iterable[dict[str, torch.Tensor]], *,
                      device: torch.device = torch.device("cpu")) -> float:
    """Images/s of `train_step` on a fresh `Pretrainer` over `batches`, after WARMUP steps (the
    loop both `bench step` sides and `bench mfu` time). Each step's loss is read, which waits for
    the device; the clock stops only once the device is done."""
    from lejepa_platform.train.step import Pretrainer, make_optimizer, train_step

    torch.manual_seed(cfg.train.seed)
    model = Pretrainer(cfg, num_classes=0, device=device).to(device)
    optimizer = make_optimizer(model, cfg)
    start, images = None, 0
    for step, batch in enumerate(batches):
        if step == WARMUP:
            start = time.perf_counter()
        metrics = train_step(model, optimizer, batch, cfg=cfg, step=step, device=device)
        float(metrics["loss/total"])
        if start is not None:
            images += batch["global"].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images / (time.perf_counter() - start)


def _ray_worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    cfg = from_dict(RunConfig, loop_config["run"])
    torch.set_num_threads(loop_config["threads"])
    views = torch.from_numpy(ray.get(loop_config["views"]).copy())  # the object store's copy is read-only
    rate = timed_train_steps(cfg, _batches(views, cfg.data.batch_size))
    with tempfile.TemporaryDirectory() as tmp:  # Result.metrics only holds metrics reported with a checkpoint
        ray.train.report({"images_per_s": rate, "process_settings": _process_settings()},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _process_settings() -> dict[str, Any]:
    """This process's niceness and values of the job's environment variables (both sides report theirs)."""
    return {"niceness": os.nice(0), **{key: os.environ.get(key) for key in JOB_ENV_VARS}}


def _plain_loop(run: dict[str, Any], steps: int, threads: int) -> tuple[float, dict[str, Any]]:
    """(images/s, process settings) of the plain loop over the bench's views (`run`: the RunConfig as a dict)."""
    cfg = from_dict(RunConfig, run)
    torch.set_num_threads(threads)
    rate = timed_train_steps(cfg, _batches(torch.from_numpy(_views(cfg, steps)), cfg.data.batch_size))
    return rate, _process_settings()


def _batches(views: torch.Tensor, batch: int) -> Iterable[dict[str, torch.Tensor]]:
    return ({"global": views[start:start + batch]} for start in range(0, len(views) - batch + 1, batch))


def _plain_in_job_env(cfg: RunConfig, steps: int, threads: int) -> tuple[float, dict[str, Any]]:
    """`_plain_loop` in a fresh Python process started with the job's environment variables (a
    subprocess rather than multiprocessing, which would re-import the caller's main module)."""
    request = json.dumps({"run": to_dict(cfg), "steps": steps, "threads": threads})
    done = subprocess.run([sys.executable, "-c", "from lejepa_platform.bench.step import _plain_main; _plain_main()"],
                          input=request, capture_output=True, text=True, env={**os.environ, **job_env_vars()})
    if done.returncode != 0:
        raise RuntimeError(f"the plain loop failed:\n{done.stderr.strip()}")
    rate, settings = json.loads(done.stdout.strip().splitlines()[-1])
    return rate, settings


def _plain_main() -> None:
    """Entry point of the plain loop's process: a JSON request on stdin, [images/s, settings] on stdout."""
    request = json.loads(sys.stdin.read())
    print(json.dumps(_plain_loop(request["run"], request["steps"], request["threads"])))


def run(quick: bool = False, compile: bool = False) -> dict[str, Any]:
    """compile: both sides train with train.compile on (the encoder compiled; warm-up steps absorb
    the compilation)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = set_values(default_run_config(), {"train.probe": False, "train.compile": compile})
    steps = 12 if quick else 40
    threads = cfg.train.torch_threads or 1
    batch = cfg.data.batch_size

    plain_before, plain_settings = _plain_in_job_env(cfg, steps, threads)
    started_here = not ray.is_initialized()
    if started_here:
        init_ray(include_dashboard=False)
    try:
        views = ray.put(_views(cfg, steps))
        ray_side = TorchTrainer(
            _ray_worker, train_loop_config={"run": to_dict(cfg), "threads": threads, "views": views},
            scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
            ).fit().metrics
    finally:
        if started_here:
            ray.shutdown()
    plain_after, _ = _plain_in_job_env(cfg, steps, threads)
    plain, with_ray = (plain_before + plain_after) / 2, ray_side["images_per_s"]
    return {
        "bench": "step",
        "workload": {"backbone": cfg.model.backbone, "batch_size": batch, "views": f"{cfg.data.global_views} x {cfg.data.global_size}px",
                     "measured_steps": steps - WARMUP, "torch_threads": threads},
        "compile": cfg.train.compile,
        "process_settings": {"plain": plain_settings, "ray_train": ray_side["process_settings"]},
        "plain_images_per_s": round(plain, 1),
        "plain_runs_images_per_s": [round(plain_before, 1), round(plain_after, 1)],
        "ray_train_images_per_s": round(with_ray, 1),
        "ratio_ray_over_plain": round(with_ray / plain, 3),
    }
