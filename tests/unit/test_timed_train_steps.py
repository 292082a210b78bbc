"""The loop every throughput bench times: its rate fits the test's own clock around the measured steps."""

import time

import pytest
import torch

from lejepa_platform.bench.step import WARMUP, timed_train_steps
from lejepa_platform.overrides import apply_overrides
from lejepa_platform.defaults import default_run_config

pytestmark = pytest.mark.unit

MEASURED = 6
BATCH = 4


def test_rate_counts_only_the_steps_after_warm_up_and_fits_inside_the_tests_clock():
    cfg = apply_overrides(default_run_config(), [
        'model.backbone_kwargs={"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 1}',
        "model.proj_hidden_dim=16", "model.proj_dim=8", "loss.num_slices=8", "data.global_views=2",
        "data.global_size=16", f"data.batch_size={BATCH}", "train.probe=false"])
    views = torch.randint(0, 256, (BATCH, 2, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    handed_out: list[float] = []  # when the loop took each batch; the last entry is its request for one more

    def batches():
        for _ in range(WARMUP + MEASURED):
            handed_out.append(time.perf_counter())
            yield {"global": views}
        handed_out.append(time.perf_counter())

    rate = timed_train_steps(cfg, batches())
    returned = time.perf_counter()
    images = MEASURED * BATCH  # warm-up steps are not counted
    assert len(handed_out) == WARMUP + MEASURED + 1
    # The loop's clock starts after it took batch WARMUP and before it asked for the next, and stops
    # after it asked for one more than there were and before it returned.
    assert images / (returned - handed_out[WARMUP]) <= rate <= images / (handed_out[-1] - handed_out[WARMUP + 1])
