"""`lejepa bench step` runs end to end (its numbers are for the README, not asserted here)."""

import os

import pytest

from lejepa_platform.bench.step import run
from lejepa_platform.ray_env import job_env_vars

pytestmark = pytest.mark.e2e


def test_step_bench_measures_both_sides_on_identical_work(ray_cluster):
    result = run(quick=True)
    assert result["workload"]["measured_steps"] == 7
    settings = result["process_settings"]
    assert settings["plain"] == settings["ray_train"] == {"niceness": os.nice(0), **job_env_vars()}  # same threads and priority
    assert result["plain_images_per_s"] > 0 and result["ray_train_images_per_s"] > 0
    assert result["plain_images_per_s"] == pytest.approx(sum(result["plain_runs_images_per_s"]) / 2, abs=0.1)
    assert result["ratio_ray_over_plain"] == pytest.approx(
        result["ray_train_images_per_s"] / result["plain_images_per_s"], rel=0.01)
