"""Golden loss curve: 20 plain `train_step` calls on one fixed tiny batch match a committed curve.

The batch (uint8 global and local views), the tiny ViT's initialisation and the CPU float32 step
are all deterministic, so any change to the loss (prediction term, SIGReg knots or quadrature,
slice directions), the normalisation or the optimizer moves the curve by far more than the
tolerance. The curve is a recorded fact, not a derivation: when a change is MEANT to alter
training, regenerate it and say why in the commit:

    python tests/unit/test_golden_loss.py --regenerate
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from lejepa_platform.config import DataConfig, LossConfig, ModelConfig, RunConfig, TrainConfig
from lejepa_platform.train.step import Pretrainer, make_optimizer, train_step

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).parent / "golden" / "train_step_loss.json"
STEPS = 20
TERMS = ("loss/total", "loss/prediction", "loss/sigreg")
TOLERANCE = 1e-4


def golden_config() -> RunConfig:
    """A tiny ViT with a small projector; loss defaults (lam, knots, t_max) left as the code has them."""
    return RunConfig(
        model=ModelConfig(backbone="vit_tiny_patch16_224",
                          backbone_kwargs={"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
                          proj_hidden_dim=64, proj_layers=2, proj_dim=16),
        loss=LossConfig(num_slices=64),
        data=DataConfig(global_views=2, global_size=16, local_views=2, local_size=8, batch_size=8),
        train=TrainConfig(steps=STEPS, warmup_frac=0.2, lr=1e-3, weight_decay=0.05, time_budget_s=0,
                          probe=True, precision="fp32"),
    )


def golden_batch() -> dict[str, torch.Tensor]:
    """Eight images' worth of uint8 views (2 global 16 px, 2 local 8 px) and labels, from a fixed seed."""
    gen = torch.Generator().manual_seed(1234)
    return {"global": torch.randint(0, 256, (8, 2, 3, 16, 16), generator=gen, dtype=torch.uint8),
            "local": torch.randint(0, 256, (8, 2, 3, 8, 8), generator=gen, dtype=torch.uint8),
            "label": torch.randint(0, 4, (8,), generator=gen)}


def loss_curve() -> dict[str, list[float]]:
    """Run the plain loop on CPU with one thread and return every term per step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = golden_config()
        torch.manual_seed(0)
        model = Pretrainer(cfg, num_classes=4)
        optimizer = make_optimizer(model, cfg)
        batch = golden_batch()
        curve: dict[str, list[float]] = {term: [] for term in TERMS}
        for step in range(STEPS):
            metrics = train_step(model, optimizer, batch, cfg=cfg, step=step, device=torch.device("cpu"))
            for term in TERMS:
                curve[term].append(float(metrics[term]))
        return curve
    finally:
        torch.set_num_threads(threads)


def test_twenty_plain_steps_on_a_fixed_batch_match_the_committed_loss_curve():
    golden = json.loads(GOLDEN.read_text())
    curve = loss_curve()
    for term in TERMS:
        assert len(golden[term]) == STEPS
        worst = max(abs(a - b) for a, b in zip(curve[term], golden[term]))
        assert worst <= TOLERANCE, f"{term} left the golden curve by {worst:.3g}: {curve[term]}"
    # The curve is a training curve, not a constant: the fixed batch's loss falls.
    assert golden["loss/total"][-1] < golden["loss/total"][0]


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: python tests/unit/test_golden_loss.py --regenerate")
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"torch": torch.__version__, **loss_curve()}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
