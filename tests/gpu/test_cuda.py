"""GPU checks: run where CUDA is present (a lent GPU machine, a cloud node), skipped elsewhere."""

import pytest
import torch

from lejepa_platform.config import apply_overrides
from lejepa_platform.defaults import default_run_config
from lejepa_platform.loss import sigreg, slice_directions

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
