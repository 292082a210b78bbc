"""`lejepa bench step` runs end to end; its rates fit inside the test's own clock (the numbers
themselves are for the README, not asserted here)."""

import os
import time

import pytest

from lejepa_platform.bench.step import run
from lejepa_platform.ray_env import job_env_vars

pytestmark = pytest.mark.e2e


def test_step_bench_measures_both_sides_on_identical_work(ray_cluster):
    started = time.perf_counter()
    result = run(quick=True)
    wall = time.perf_counter() - started
    assert result["workload"] == {"backbone": "vit_tiny_patch16_224", "batch_size": 128, "views": "4 x 32px",
                                  "measured_steps": 12 - 5, "torch_threads": 2}  # quick: 12 steps, 5 of warm-up
    settings = result["process_settings"]
    assert settings["plain"] == settings["ray_train"] == {"niceness": os.nice(0), **job_env_vars()}  # same threads and priority
    # Three timed loops of 7 x 128 images ran one after another inside this call.
    before, after = result["plain_runs_images_per_s"]
    assert sum(7 * 128 / rate for rate in (before, after, result["ray_train_images_per_s"])) < wall
    assert min(before, after) <= result["plain_images_per_s"] <= max(before, after)
    assert 0 < result["ratio_ray_over_plain"] < 10
