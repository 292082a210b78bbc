"""DDP equivalence of one full training step: 2 gloo ranks with batch B each give the same loss
and the same (averaged) gradients as 1 process with batch 2B. This is what the cross-rank SIGReg
and the global batch norm in the projector buy; the ViT backbone uses LayerNorm only."""

from __future__ import annotations

import pytest
import torch
from gloo import run_in_gloo

from lejepa_platform.config import RunConfig, to_dict
from lejepa_platform.overrides import apply_overrides, from_dict
from lejepa_platform.defaults import default_run_config

pytestmark = pytest.mark.dist

B = 8


def _config() -> RunConfig:
    return apply_overrides(default_run_config(), [
        'model.backbone_kwargs={"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}',
        "model.proj_hidden_dim=64", "model.proj_dim=16", "model.proj_norm=batchnorm", "loss.num_slices=64",
        "data.global_views=2", "data.global_size=16", "data.local_views=2", "data.local_size=8",
        f"data.batch_size={2 * B}", "train.steps=10"])


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"global": torch.randint(0, 256, (2 * B, 2, 3, 16, 16), generator=gen, dtype=torch.uint8),
            "local": torch.randint(0, 256, (2 * B, 2, 3, 8, 8), generator=gen, dtype=torch.uint8),
            "label": torch.randint(0, 10, (2 * B,), generator=gen)}


def _one_step(rank: int, cfg_dict: dict, batch: dict[str, torch.Tensor], world: int) -> tuple[float, dict]:
    """Build the model, take optimizer step 0 on this rank's rows, return its loss and gradients."""
    from lejepa_platform.train.step import Pretrainer, make_optimizer, train_step

    cfg = from_dict(RunConfig, cfg_dict)
    torch.manual_seed(0)
    model = Pretrainer(cfg, num_classes=10)
    optimizer = make_optimizer(model, cfg)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    rows = slice(rank * (2 * B // world), (rank + 1) * (2 * B // world))
    metrics = train_step(wrapped, optimizer, {k: v[rows] for k, v in batch.items()}, cfg=cfg, step=0,
                         device=torch.device("cpu"))
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return float(metrics["loss/total"]), grads


def test_two_ranks_match_one_process_on_the_whole_batch():
    cfg, batch = _config(), _batch()
    single_loss, single_grads = _one_step(0, to_dict(cfg), batch, 1)
    per_rank = run_in_gloo(2, _one_step, to_dict(cfg), batch, 2)

    dist_loss = sum(loss for loss, _ in per_rank) / 2
    assert dist_loss == pytest.approx(single_loss, rel=1e-5)
    for rank_grads in (per_rank[0][1], per_rank[1][1]):
        assert rank_grads.keys() == single_grads.keys()
        for name, grad in single_grads.items():
            torch.testing.assert_close(rank_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
