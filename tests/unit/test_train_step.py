"""One optimizer step without Ray: schedule (steps and time budget), non-finite stop, probe isolation."""

import math

import pytest
import torch

from lejepa_platform.overrides import apply_overrides
from lejepa_platform.defaults import default_run_config
from lejepa_platform.train.step import (NonFiniteLossError, Pretrainer, lr_factor, make_optimizer, schedule_position,
                                        train_step)

pytestmark = pytest.mark.unit


def tiny():
    return apply_overrides(default_run_config(), [
        'model.backbone_kwargs={"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}',
        "model.proj_hidden_dim=32", "model.proj_dim=16", "loss.num_slices=32", "data.global_views=2",
        "data.global_size=16", "data.batch_size=8", "train.steps=100", "train.warmup_frac=0.1",
        "train.time_budget_s=0"])


def batch(cfg):
    gen = torch.Generator().manual_seed(0)
    return {"global": torch.randint(0, 256, (8, 2, 3, 16, 16), generator=gen, dtype=torch.uint8),
            "label": torch.randint(0, 10, (8,), generator=gen)}


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine_to_a_thousandth():
    cfg = tiny()
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, cfg) == pytest.approx(1e-3)
    assert lr_factor(4.5, cfg) == pytest.approx(0.55)  # positions between steps (time budget)


def test_without_a_time_budget_the_schedule_follows_the_steps_whatever_the_time():
    cfg = tiny()
    assert schedule_position(0, cfg, trained_s=1e6, step_s=1e3) == (0.0, False)
    assert schedule_position(98, cfg, trained_s=1e6, step_s=1e3) == (98.0, False)
    assert schedule_position(99, cfg, trained_s=0.0, step_s=0.0) == (99.0, True)


def test_a_time_budget_moves_the_schedule_by_whichever_is_further_along_and_ends_it_on_time():
    cfg = apply_overrides(tiny(), ["train.time_budget_s=60"])
    # Time behind the steps: the step decides. Ahead: 99 x 30/60 = 49.5 of the 99 positions.
    assert schedule_position(60, cfg, trained_s=30.0, step_s=0.5) == (60.0, False)
    assert schedule_position(20, cfg, trained_s=30.0, step_s=0.5) == (49.5, False)
    # The step expected to end at or past the budget is the last, at the last position (lr / 1000).
    assert schedule_position(20, cfg, trained_s=59.5, step_s=0.5) == (99.0, True)
    assert schedule_position(20, cfg, trained_s=59.4, step_s=0.5) == (pytest.approx(99 * 59.4 / 60), False)
    assert lr_factor(schedule_position(20, cfg, trained_s=59.5, step_s=0.5)[0], cfg) == lr_factor(99, cfg)
    # Still never more than train.steps steps.
    assert schedule_position(99, cfg, trained_s=1.0, step_s=0.1) == (99.0, True)


def test_non_finite_loss_stops_before_the_update_and_names_step_and_terms():
    cfg = tiny()
    torch.manual_seed(0)
    model = Pretrainer(cfg, num_classes=10)
    optimizer = make_optimizer(model, cfg)
    with torch.no_grad():
        model.encoder.backbone.patch_embed.proj.weight[0, 0, 0, 0] = float("nan")
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 7: loss/total=nan, loss/prediction="):
        train_step(model, optimizer, batch(cfg), cfg=cfg, step=7, device=torch.device("cpu"))
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, before[name], equal_nan=True, msg=name)  # no update applied
    for state in optimizer.state.values():  # AdamW never stepped: no step counted, no moment accumulated
        assert int(state["step"]) == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()


def test_probe_learns_from_detached_embeddings_only():
    cfg = tiny()
    torch.manual_seed(0)
    with_probe = Pretrainer(cfg, num_classes=10)
    torch.manual_seed(0)
    without = Pretrainer(apply_overrides(cfg, ["train.probe=false"]), num_classes=10)
    for model in (with_probe, without):
        train_step(model, make_optimizer(model, cfg), batch(cfg), cfg=cfg, step=0, device=torch.device("cpu"))
    for (name, a), (_, b) in zip(with_probe.encoder.named_parameters(), without.encoder.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)  # the probe loss never reaches the encoder
