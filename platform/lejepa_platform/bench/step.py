"""`lejepa bench step`: steady-state training throughput of the Ray Train path against a plain
single-process PyTorch loop doing identical work, in one run.

Both sides train the embedded default's model with the same `train_step` on the same in-memory
uint8 views (made once, so augmentation cost is out of the picture): the plain loop indexes a
tensor, the Ray side runs one TorchTrainer worker that streams the same views from a materialised
Ray Dataset through `iter_torch_batches` and reports metrics like a real run. Warm-up steps are
excluded; the ratio ray / plain is what Ray Train costs per step. The plain loop runs before and
after the Ray side and the ratio uses their mean: on a 2-core VM one plain run alone varied by
about 15 % between invocations (474 to 557 img/s), which swung the ratio from 0.81 to 0.96.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import numpy as np
import torch

from lejepa_platform.config import RunConfig, from_dict, set_values, to_dict
from lejepa_platform.defaults import default_run_config
from lejepa_platform.ray_env import init_ray

WARMUP = 5


def _views(cfg: RunConfig, batches: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    d = cfg.data
    return rng.integers(0, 256, size=(batches * d.batch_size, d.global_views, 3, d.global_size, d.global_size),
                        dtype=np.uint8)


def _timed_loop(cfg: RunConfig, batches, threads: int) -> float:
    """Images/s of train_step over `batches` (an iterable of dicts), after WARMUP steps."""
    from lejepa_platform.train.step import Pretrainer, make_optimizer, train_step

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed)
    device = torch.device("cpu")
    model = Pretrainer(cfg, num_classes=0, device=device)
    optimizer = make_optimizer(model, cfg)
    start, images = None, 0
    for step, batch in enumerate(batches):
        if step == WARMUP:
            start = time.perf_counter()
        metrics = train_step(model, optimizer, batch, cfg=cfg, step=step, device=device)
        float(metrics["loss/total"])
        if start is not None:
            images += batch["global"].shape[0]
    return images / (time.perf_counter() - start)


def _ray_worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    cfg = from_dict(RunConfig, loop_config["run"])
    shard = ray.train.get_dataset_shard("train")
    batches = shard.iter_torch_batches(batch_size=cfg.data.batch_size, drop_last=True)
    rate = _timed_loop(cfg, batches, loop_config["threads"])
    with tempfile.TemporaryDirectory() as tmp:  # Result.metrics only holds metrics reported with a checkpoint
        ray.train.report({"images_per_s": rate}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def run(quick: bool = False) -> dict[str, Any]:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = set_values(default_run_config(), {"train.probe": False})
    steps = 12 if quick else 40
    threads = cfg.train.torch_threads or 1
    views = _views(cfg, steps)
    tensor = torch.from_numpy(views)
    batch = cfg.data.batch_size

    def plain_loop() -> float:
        return _timed_loop(cfg, ({"global": tensor[i * batch:(i + 1) * batch]} for i in range(steps)), threads)

    plain_before = plain_loop()

    started_here = not ray.is_initialized()
    if started_here:
        init_ray(include_dashboard=False)
    try:
        dataset = ray.data.from_numpy(views).rename_columns({"data": "global"}).materialize()
        with_ray = TorchTrainer(
            _ray_worker, train_loop_config={"run": to_dict(cfg), "threads": threads},
            scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
            datasets={"train": dataset}).fit().metrics["images_per_s"]
    finally:
        if started_here:
            ray.shutdown()
    plain_after = plain_loop()
    plain = (plain_before + plain_after) / 2
    return {
        "bench": "step",
        "workload": {"backbone": cfg.model.backbone, "batch_size": batch, "views": f"{cfg.data.global_views} x {cfg.data.global_size}px",
                     "measured_steps": steps - WARMUP, "torch_threads": threads},
        "plain_images_per_s": round(plain, 1),
        "plain_runs_images_per_s": [round(plain_before, 1), round(plain_after, 1)],
        "ray_train_images_per_s": round(with_ray, 1),
        "ratio_ray_over_plain": round(with_ray / plain, 3),
    }
