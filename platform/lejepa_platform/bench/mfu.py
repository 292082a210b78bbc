"""`lejepa bench mfu`: images/s and model FLOPs utilisation of one training step of ViT-S/16 with
the paper's views (2 x 224 px global + 6 x 96 px local), bf16 autocast on a GPU.

The step is the platform's own `train_step` (encoder, projector, SIGReg with 1024 slices, AdamW) on
uint8 views already on the device, so the number is the model's, not the data pipeline's. FLOPs
per image are counted by torch (`FlopCounterMode`: matmuls, convolutions and attention of the
encoder's forward over all eight views, times 3 for forward + backward); MFU divides the achieved
FLOPs/s by the device's dense bf16 peak. The baseline is that peak: known for the GPUs listed in
PEAK_BF16_TFLOPS, otherwise `mfu` is null and the FLOPs/s stand alone. Without a GPU the bench
runs the same code in float32 on the CPU with a small batch (a smoke run, no MFU).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from lejepa_platform.bench.step import WARMUP, timed_train_steps
from lejepa_platform.config import DataConfig, LossConfig, ModelConfig, RunConfig, TrainConfig
from lejepa_platform.model.flops import training_flops_per_image

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0}
"""Dense bf16 tensor-core peaks from the vendors' data sheets (SXM parts for H100/H200), matched by
substring of the device name; a PCIe H100 (756) reads as SXM, so its MFU would come out low."""


def workload(batch_size: int, device: torch.device) -> RunConfig:
    """ViT-S/16 with the paper's multi-crop and SIGReg settings; bf16 on GPU, float32 on CPU."""
    return RunConfig(
        model=ModelConfig(backbone="vit_small_patch16_224", proj_hidden_dim=2048, proj_layers=3, proj_dim=128,
                          proj_norm="batchnorm"),
        loss=LossConfig(lam=0.05, num_slices=1024),
        data=DataConfig(global_views=2, global_size=224, local_views=6, local_size=96, batch_size=batch_size),
        train=TrainConfig(steps=1000, probe=False, precision="bf16" if device.type == "cuda" else "fp32"),
    )


def peak_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of a known GPU, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def _batch(cfg: RunConfig, device: torch.device) -> dict[str, torch.Tensor]:
    d, gen = cfg.data, torch.Generator().manual_seed(0)

    def views(count: int, size: int) -> torch.Tensor:
        return torch.randint(0, 256, (d.batch_size, count, 3, size, size), generator=gen, dtype=torch.uint8).to(device)

    return {"global": views(d.global_views, d.global_size), "local": views(d.local_views, d.local_size)}


def run(quick: bool = False) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        batch_size, steps = (64, 5) if quick else (256, 20)
    else:
        batch_size, steps = (2, 1) if quick else (8, 3)
    cfg = workload(batch_size, device)
    flops = training_flops_per_image(cfg)
    images_per_s = timed_train_steps(cfg, itertools.repeat(_batch(cfg, device), WARMUP + steps), device=device)
    step_s = batch_size / images_per_s
    achieved = images_per_s * flops / 1e12
    peak = peak_tflops(device)
    return {
        "bench": "mfu",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": cfg.train.precision,
        "workload": {"backbone": cfg.model.backbone, "views": "2 x 224px + 6 x 96px", "batch_size": batch_size,
                     "num_slices": cfg.loss.num_slices, "measured_steps": steps},
        "train_gflops_per_image": round(flops / 1e9, 2),
        "seconds_per_step": round(step_s, 4),
        "images_per_s": round(images_per_s, 3),
        "achieved_tflops": round(achieved, 4),
        "peak_bf16_tflops": peak,
        "mfu": round(achieved / peak, 4) if peak else None,
    }
