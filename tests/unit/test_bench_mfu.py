"""`lejepa bench mfu`: the FLOPs it divides by are ViT-S/16's closed form; its rates fit the test's own clock."""

import time

import pytest
import torch

from lejepa_platform.bench.mfu import peak_tflops, run, workload
from lejepa_platform.model.flops import training_flops_per_image

pytestmark = pytest.mark.unit


def vit_forward_flops(size: int, patch: int = 16, width: int = 384, depth: int = 12) -> int:
    """Multiply-adds x 2 of a ViT forward: patch embedding, then per block qkv (6TD^2), scores and
    attention-weighted values (4T^2 D), output projection (2TD^2) and the 4x MLP (16TD^2)."""
    patches = (size // patch) ** 2
    tokens = patches + 1  # class token
    return 2 * patches * 3 * patch * patch * width + depth * (24 * tokens * width**2 + 4 * tokens**2 * width)


def vit_s16_training_flops() -> int:
    """Forward + backward (3x forward) of ViT-S/16 and the 384-2048-2048-128 projector over 2 x 224 + 6 x 96 px views."""
    projector = 2 * (384 * 2048 + 2048 * 2048 + 2048 * 128)  # three linear layers per view
    per_view = {224: vit_forward_flops(224) + projector, 96: vit_forward_flops(96) + projector}
    return 3 * (2 * per_view[224] + 6 * per_view[96])


def test_training_flops_per_image_are_vit_s16_closed_form_over_all_eight_views():
    cfg = workload(batch_size=2, device=torch.device("cpu"))
    expected = vit_s16_training_flops()
    assert training_flops_per_image(cfg) == pytest.approx(expected, rel=1e-9)
    assert expected / 1e9 == pytest.approx(3 * (2 * 9.2 + 6 * 1.7), rel=0.05)  # ~4.6 GMACs per 224 px view


def test_cpu_smoke_run_reports_the_closed_form_flops_and_a_rate_the_wall_clock_allows():
    started = time.perf_counter()
    result = run(quick=True)
    wall = time.perf_counter() - started
    assert result["device"] == "cpu" and result["precision"] == "fp32" and result["mfu"] is None
    assert result["workload"] == {"backbone": "vit_small_patch16_224", "views": "2 x 224px + 6 x 96px",
                                  "batch_size": 2, "num_slices": 1024, "measured_steps": 1}
    assert result["train_gflops_per_image"] == round(vit_s16_training_flops() / 1e9, 2)
    # One measured step of 2 images fits inside the whole call, warm-up and model build included.
    assert 0 < 2 / result["images_per_s"] < wall
    assert result["achieved_tflops"] == pytest.approx(result["images_per_s"] * vit_s16_training_flops() / 1e12,
                                                      rel=1e-2, abs=1e-4)
    assert peak_tflops(torch.device("cpu")) is None
