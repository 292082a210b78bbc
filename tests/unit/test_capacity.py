"""One rule for leaving the data tasks a CPU: a single run and a sweep's trial count agree on it."""

import pytest

from lejepa_platform.capacity import DATA_CPUS, check_room_for_data, trainers_that_fit
from lejepa_platform.config import RunConfig, SweepConfig, TrainConfig
from lejepa_platform.errors import UserError
from lejepa_platform.sweep.tune import concurrency

pytestmark = pytest.mark.unit


def sweep_of(workers: int, cpus_per_worker: float, max_concurrent: int = 0) -> SweepConfig:
    base = RunConfig(train=TrainConfig(workers=workers, cpus_per_worker=cpus_per_worker))
    return SweepConfig(base=base, space={"loss.lam": {"grid": [0.02]}}, max_concurrent_trials=max_concurrent)


def test_a_whole_cpu_stays_free_for_the_data_tasks():
    assert DATA_CPUS == 1.0
    check_room_for_data(1.0, 2.0, "x")  # 1 for the trainer, 1 for data: fits exactly
    with pytest.raises(UserError, match=r"^x = 1.5 CPUs, but this cluster has 2 and the data tasks need 1 of them left"):
        check_room_for_data(1.5, 2.0, "x")  # half a CPU left: one-CPU data tasks could never start


@pytest.mark.parametrize("trainer, cluster, fit", [(1.0, 2.0, 1), (1.0, 8.0, 7), (2.0, 8.0, 3), (0.5, 2.0, 2)])
def test_trainers_that_fit_side_by_side_leave_one_cpu(trainer, cluster, fit):
    assert trainers_that_fit(trainer, cluster) == fit


def test_sweep_concurrency_follows_the_same_rule():
    assert concurrency(sweep_of(2, 1.0), cpus=8.0, gpus=0.0) == 3  # (8 - 1) // 2
    assert concurrency(sweep_of(1, 1.0, max_concurrent=2), cpus=8.0, gpus=0.0) == 2
    with pytest.raises(UserError, match="one trial's train.workers x train.cpus_per_worker = 2 CPUs, but this cluster has 2"):
        concurrency(sweep_of(2, 1.0), cpus=2.0, gpus=0.0)
