"""`lejepa bench e2e --quick`: both sides train under the same short budget on the same work, and the
report's numbers agree with one another (its ratios are for the README, not asserted here)."""

import os

import pytest

from lejepa_platform.bench.e2e import QUICK_SECONDS, run
from lejepa_platform.ray_env import job_env_vars

pytestmark = pytest.mark.e2e


def test_e2e_bench_trains_both_sides_on_the_same_work():
    result = run(quick=True)
    settings = result["settings"]
    platform, bare = result["runs"]
    assert [platform["side"], bare["side"]] == ["platform", "bare"]
    for side in (platform, bare):
        assert side["steps"] > 0 and side["stopped_by"] == "time budget"
        step_s = side["train_seconds"] / side["steps"]
        assert abs(side["train_seconds"] - QUICK_SECONDS) <= 2 * step_s + 0.5  # the budget ended the run
        assert side["images_per_s"] == pytest.approx(side["steps"] * settings["batch_size"] / side["train_seconds"],
                                                     rel=1e-3)
        training = side["training"]
        assert sum(training["cpu_shares"].values()) == pytest.approx(1.0, abs=1e-3)
        assert training["cpu_s"]["trainer"] > 0 and training["cpu_s"]["data_tasks"] > 0
        assert sum(training["cpu_s"].values()) <= 1.1 * os.cpu_count() * side["train_seconds"]  # no CPU counted twice
    # the bare side's tree is reaped through its root: the kernel's total checks the sampling (tails are missed)
    whole = bare["whole_run"]
    assert 0.8 * whole["reaped_cpu_s"] <= whole["sampled_cpu_s"] <= whole["reaped_cpu_s"] + 0.5
    assert platform["training"]["cpu_s"]["ray"] > 0

    # same model, batch, views and data processes on both sides
    assert platform["backbone_params"] == bare["backbone_params"] > 0
    assert bare["batch_shapes"] == {"global": [settings["batch_size"], 4, 3, 32, 32]}  # the embedded default's views
    assert platform["data_processes"] == bare["data_processes"] == bare["data_processes_seen"] == settings["data_processes"]
    assert 1 <= platform["data_processes_seen"] <= platform["data_processes"]
    trainers = result["process_settings"]
    assert trainers["platform_trainer"] == trainers["bare"] == {"niceness": os.nice(0), **job_env_vars()}

    ratio = result["ratio_steps"]
    assert ratio["each"] == [round(platform["steps"] / bare["steps"], 3)]
    assert ratio["median"] == ratio["min"] == ratio["max"] == ratio["each"][0]
    assert result["platform"]["steps"]["each"] == [platform["steps"]]
    assert result["bare"]["images_per_s"]["median"] == bare["images_per_s"]
