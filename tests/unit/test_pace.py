"""The run's pace without a device read: steps planned from numbers agreed at logging steps, and
zero synchronising calls on the steps in between."""

import pytest
import torch

from lejepa_platform.data.pipeline import rebatch
from lejepa_platform.data.stream import StreamPosition
from lejepa_platform.defaults import default_run_config
from lejepa_platform.overrides import apply_overrides
from lejepa_platform.train import bookkeeping
from lejepa_platform.train.bookkeeping import Pace
from lejepa_platform.train.step import FiniteCheck, NonFiniteLossError, Pretrainer, make_optimizer, train_step

pytestmark = pytest.mark.unit


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class StopAfter:
    """Stands in for StopRequests: the driver's stop request is seen from the n-th poll on."""

    def __init__(self, polls: int) -> None:
        self.polls, self.left = 0, polls

    def seen(self) -> bool:
        self.polls += 1
        return self.polls > self.left


def config(*extra):
    return apply_overrides(default_run_config(), [
        'model.backbone_kwargs={"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}',
        "model.proj_hidden_dim=32", "model.proj_dim=16", "loss.num_slices=32", "data.global_views=2",
        "data.local_views=0", "data.global_size=16", "data.batch_size=8", "train.time_budget_s=0", *extra])


def on_fake_clock(monkeypatch, *overrides: str, before_s: float = 0.0,
                  stop: StopAfter | None = None) -> tuple[FakeClock, Pace]:
    """A one-rank Pace on the CPU whose clock only moves when the test moves it."""
    clock = FakeClock()
    monkeypatch.setattr(bookkeeping.time, "perf_counter", clock)
    pace = Pace(config(*overrides), trained_before_s=before_s, stop=stop or StopAfter(10**6), world=1,
                device=torch.device("cpu"))
    return clock, pace


def test_the_budget_ends_the_run_on_the_step_the_agreed_pace_predicts(monkeypatch):
    stop = StopAfter(10**6)
    clock, pace = on_fake_clock(monkeypatch, "train.steps=1000", "train.time_budget_s=60", "train.log_every=10",
                                "train.checkpoint_every=1000", stop=stop)
    plans = []
    for step in range(1000):
        plans.append(pace.plan(step))
        clock.now += 0.5  # every step takes half a second
        if plans[-1].last:
            break
    # Agreed at step 110 (after the logging step 110): 55 s trained, 0.5 s a step. Step 119 is
    # expected to end at 60 s: the last, at the schedule's last position.
    assert len(plans) == 120 and plans[-1].last and plans[-1].logging and plans[-1].position == 999.0
    assert [s for s, p in enumerate(plans) if p.logging] == [*range(9, 119, 10), 119]
    # Agreed at the first two steps, after each of the 11 earlier logging steps, and at step 119 to
    # confirm the predicted end: never in between.
    assert stop.polls == 14
    # Between agreements the position follows the predicted time: step 115 at 55 + 5 x 0.5 s.
    assert plans[115].position == pytest.approx(999 * 57.5 / 60)
    assert pace.seconds() == pytest.approx(60.0)


def test_earlier_attempts_time_counts_and_a_stop_ends_after_the_next_planned_step(monkeypatch):
    clock, pace = on_fake_clock(monkeypatch, "train.steps=100", "train.log_every=4", "train.checkpoint_every=100",
                                before_s=30.0, stop=StopAfter(2))
    assert pace.seconds() == 30.0  # before the first step: what earlier attempts spent
    plans = [pace.plan(step) for step in range(40, 45)]
    # Polled at steps 40 and 41 (the first two) and after the logging step 43; the stop is seen at
    # the third poll, so step 44 is the last before stopping.
    assert [p.logging for p in plans[:4]] == [False, False, False, True]
    assert not any(p.stopping for p in plans[:4]) and plans[4].stopping and plans[4].logging and not plans[4].last
    clock.now += 2.0
    assert pace.seconds() == pytest.approx(32.0)


def test_no_synchronising_call_on_steps_that_do_not_log(monkeypatch):
    cfg = config("train.steps=100", "train.log_every=5", "train.checkpoint_every=100")
    torch.manual_seed(0)
    model = Pretrainer(cfg, num_classes=10)
    optimizer = make_optimizer(model, cfg)
    device = torch.device("cpu")
    pace = Pace(cfg, trained_before_s=0.0, stop=StopAfter(10**6), world=1, device=device)
    finite = FiniteCheck(device)
    gen = torch.Generator().manual_seed(0)
    blocks = [{"global": torch.randint(0, 256, (8, 2, 3, 16, 16), generator=gen, dtype=torch.uint8).numpy(),
               "label": torch.randint(-1, 10, (8,), generator=gen).numpy(),
               "uid": torch.arange(8).numpy(), "item": torch.zeros(8, dtype=torch.int64).numpy(),
               "row": torch.arange(8 * i, 8 * i + 8).numpy()} for i in range(5)]
    batches = list(rebatch(blocks, 8))
    calls = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name, **k: calls.append(_n) or _f(self, *a, **k))
    position, counted = StreamPosition(), []
    for step, batch in enumerate(batches):
        plan = pace.plan(step)
        calls.clear()
        train_step(model, optimizer, batch, cfg=cfg, step=step, device=device, position=plan.position,
                   diagnostics=plan.logging, finite=finite)
        position = position.after(batch["item"][-1], batch["row"][-1])
        counted.append((plan.logging, len(calls)))
    assert counted[:4] == [(False, 0)] * 4  # the four steps before the first logging step read nothing
    assert counted[4][0] and position == StreamPosition(0, 40)
    calls.clear()
    finite.raise_if_nonfinite()
    assert calls == ["__int__"]  # the logging step's one read of the finiteness flag


def test_a_non_finite_loss_is_raised_at_the_logging_step_naming_the_first_bad_step():
    cfg = config("train.steps=100")
    torch.manual_seed(0)
    model = Pretrainer(cfg, num_classes=10)
    optimizer = make_optimizer(model, cfg)
    finite = FiniteCheck(torch.device("cpu"))
    batch = {"global": torch.randint(0, 256, (8, 2, 3, 16, 16), dtype=torch.uint8), "label": torch.arange(8)}
    train_step(model, optimizer, batch, cfg=cfg, step=0, device=torch.device("cpu"), finite=finite)
    finite.raise_if_nonfinite()  # a finite step: nothing to raise
    good = {k: v.detach().clone() for k, v in model.named_parameters()}
    with torch.no_grad():
        model.encoder.backbone.patch_embed.proj.weight[0, 0, 0, 0] = float("nan")
    for step in (1, 2, 3):  # three bad steps, read once afterwards
        train_step(model, optimizer, batch, cfg=cfg, step=step, device=torch.device("cpu"), finite=finite)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 1: loss/total=nan"):
        finite.raise_if_nonfinite()
    for name, param in model.named_parameters():  # no update was applied by any of the bad steps
        if name != "encoder.backbone.patch_embed.proj.weight":
            torch.testing.assert_close(param, good[name], msg=name)


def test_a_slow_first_step_does_not_end_a_budgeted_run_early(monkeypatch):
    clock, pace = on_fake_clock(monkeypatch, "train.steps=1000", "train.time_budget_s=8", "train.log_every=10",
                                "train.checkpoint_every=1000")
    steps = 0
    while not pace.plan(steps).last:
        clock.now += 3.0 if steps == 0 else 0.5  # start-up makes the first step six times slower
        steps += 1
    # 3 s + 9 x 0.5 s = 7.5 s before step 10, which ends at the 8 s budget: the last. The first
    # step alone predicted the end after step 2 (3 + 2 x 3 s); a fresh agreement corrected it.
    assert steps == 10


def test_a_checkpoint_between_steps_does_not_end_a_budgeted_run_early(monkeypatch):
    clock, pace = on_fake_clock(monkeypatch, "train.steps=1000", "train.time_budget_s=20", "train.log_every=1",
                                "train.checkpoint_every=5")
    steps = 0
    while not pace.plan(steps).last:
        clock.now += 0.5  # the step
        steps += 1
        if steps % 5 == 0:
            with pace.not_stepping():
                clock.now += 3.0  # the checkpoint after it
    # Step 19 (0-based) starts at 19 x 0.5 s + 3 checkpoints x 3 s = 18.5 s and is expected to end
    # at 19 s: not the last; step 20 starts at 22 s (a checkpoint came between) and is. Counted as
    # a step, the checkpoint after step 14 made step 15 look 3.5 s long (16.5 + 3.5 s = 20 s): the
    # run would have ended there, with 3.5 s of its budget unused.
    assert steps == 20
    assert pace.seconds() == pytest.approx(22.0)
