"""GPU checks: run where CUDA is present (a lent GPU machine, a cloud node), skipped elsewhere."""

import dataclasses

import pytest
import torch

import view_checks
from view_checks import assert_views_match

from lejepa_platform.config import DataConfig
from lejepa_platform.data import views as V
from lejepa_platform.defaults import default_run_config
from lejepa_platform.loss import sigreg, slice_directions
from lejepa_platform.overrides import apply_overrides

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_sigreg_on_cuda_matches_cpu_in_value_and_gradient():
    z = torch.randn(2, 512, 64, generator=torch.Generator().manual_seed(0))
    a = slice_directions(64, 1024, seed=0, step=3)
    values, grads = [], []
    for device in ("cpu", "cuda"):
        x = z.to(device).requires_grad_(True)
        value = sigreg(x, a.to(device))
        value.backward()
        values.append(value.item())
        grads.append(x.grad.cpu())
    assert values[1] == pytest.approx(values[0], rel=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


def test_bf16_training_step_on_cuda_is_finite_and_sigreg_stays_float32():
    from lejepa_platform.train.step import Pretrainer, make_optimizer, train_step

    cfg = apply_overrides(default_run_config(), ["train.precision=bf16", "data.batch_size=32"])
    device = torch.device("cuda")
    model = Pretrainer(cfg, num_classes=10, device=device).to(device)
    optimizer = make_optimizer(model, cfg)
    batch = {"global": torch.randint(0, 256, (32, 4, 3, 32, 32), dtype=torch.uint8),
             "label": torch.randint(0, 10, (32,))}
    metrics = train_step(model, optimizer, batch, cfg=cfg, step=0, device=device)
    assert torch.isfinite(metrics["loss/total"]) and metrics["loss/sigreg"].dtype == torch.float32


def test_mfu_bench_runs_bf16_on_the_gpu_and_stays_below_the_peak():
    from lejepa_platform.bench.mfu import run

    result = run(quick=True)
    assert result["precision"] == "bf16" and result["images_per_s"] > 0
    if result["peak_bf16_tflops"] is not None:
        assert 0 < result["mfu"] < 1


PAPER = DataConfig()
EVERY_OP = dataclasses.replace(PAPER, flip_p=1.0, jitter_p=1.0, grayscale_p=0.5, blur_p=1.0, solarize_p=1.0)


@pytest.mark.parametrize("cfg", [PAPER, EVERY_OP, default_run_config().data], ids=["paper", "every_op", "default"])
def test_device_placement_views_on_cuda_equal_the_cpu_path(fmnist_sample, image_tools, cfg):
    """The trainer's path (crops and params copied to the GPU, augment_views there: the blend,
    without one host-device synchronisation) against the data side's on CPU (multi_crop, index
    subsets), on real decoded records."""
    if cfg.global_size == 224:
        arrays, ids = view_checks.jpeg_records(fmnist_sample, image_tools, cfg)
    else:
        arrays, ids = view_checks.png_records(fmnist_sample, cfg)
    on_cpu = V.multi_crop(arrays, ids, cfg, seed=3, epoch=1)
    crops = V.multi_crop(arrays, ids, cfg, seed=3, epoch=1, photometric=False)
    batch = {k: torch.from_numpy(v).cuda() for k, v in crops.items()}
    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation inside raises
    try:
        on_gpu = V.augment_views(batch, cfg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sorted(on_gpu) == ["global", "local"] and on_gpu["global"].device.type == "cuda"
    for name in ("global", "local") if cfg.local_views else ("global",):
        assert_views_match(on_gpu[name].cpu(), torch.from_numpy(on_cpu[name]))


def test_compiled_bf16_training_step_on_cuda_with_device_augmentation():
    """train.compile's path: the encoder compiled in place; views augmented on the device in the step."""
    from lejepa_platform.train.step import Pretrainer, make_optimizer, train_step

    cfg = apply_overrides(default_run_config(), ["train.precision=bf16", "data.batch_size=32"])
    device = torch.device("cuda")
    model = Pretrainer(cfg, num_classes=10, device=device).to(device)
    model.encoder.compile()
    optimizer = make_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(0)
    before = [p.detach().clone() for p in model.encoder.parameters()]
    for step in range(3):  # the first step compiles; the next ones run the compiled graphs
        batch = {"global": torch.randint(0, 256, (32, 4, 3, 32, 32), dtype=torch.uint8, generator=generator),
                 "global_params": torch.rand((32, 4, V.PHOTOMETRIC_PARAMS), generator=generator),
                 "label": torch.randint(0, 10, (32,), generator=generator)}
        metrics = train_step(model, optimizer, batch, cfg=cfg, step=step, device=device)
        assert torch.isfinite(metrics["loss/total"]) and metrics["loss/sigreg"].dtype == torch.float32
    assert any(not torch.equal(a, b) for a, b in zip(before, model.encoder.parameters()))
