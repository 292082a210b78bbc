"""`lejepa bench mfu`: the FLOPs it divides by are ViT-S/16's closed form; its numbers are consistent."""

import pytest
import torch

from lejepa_platform.bench.mfu import peak_tflops, run, workload
from lejepa_platform.train.finalize import training_flops_per_image

pytestmark = pytest.mark.unit


def vit_forward_flops(size: int, patch: int = 16, width: int = 384, depth: int = 12) -> int:
    """Multiply-adds x 2 of a ViT forward: patch embedding, then per block qkv (6TD^2), scores and
    attention-weighted values (4T^2 D), output projection (2TD^2) and the 4x MLP (16TD^2)."""
    patches = (size // patch) ** 2
    tokens = patches + 1  # class token
    return 2 * patches * 3 * patch * patch * width + depth * (24 * tokens * width**2 + 4 * tokens**2 * width)


def test_training_flops_per_image_are_vit_s16_closed_form_over_all_eight_views():
    cfg = workload(batch_size=2, device=torch.device("cpu"))
    projector = 2 * (384 * 2048 + 2048 * 2048 + 2048 * 128)  # three linear layers per view
    per_view = {224: vit_forward_flops(224) + projector, 96: vit_forward_flops(96) + projector}
    expected = 3 * (2 * per_view[224] + 6 * per_view[96])
    assert training_flops_per_image(cfg) == pytest.approx(expected, rel=1e-9)
    assert expected / 1e9 == pytest.approx(3 * (2 * 9.2 + 6 * 1.7), rel=0.05)  # ~4.6 GMACs per 224 px view


def test_cpu_smoke_run_reports_consistent_numbers_and_no_mfu():
    result = run(quick=True)
    assert result["device"] == "cpu" and result["precision"] == "fp32" and result["mfu"] is None
    assert result["images_per_s"] == pytest.approx(result["workload"]["batch_size"] / result["seconds_per_step"], rel=1e-2)
    assert result["achieved_tflops"] == pytest.approx(
        result["images_per_s"] * result["train_gflops_per_image"] / 1e3, rel=1e-2)
    assert peak_tflops(torch.device("cpu")) is None
