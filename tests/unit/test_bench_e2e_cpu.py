"""`bench e2e`'s CPU accounting on hand-made samples (closed-form charges), its process names, and
its option checks (refused before anything runs)."""

import pytest

from lejepa_platform.bench.e2e import ProcessSample, charge, platform_group, process_name
from lejepa_platform.cli import main

pytestmark = pytest.mark.unit


def snapshot(*procs: tuple[int, int, str, float]) -> dict:
    return {(pid, start): ProcessSample(pid, name, cpu) for pid, start, name, cpu in procs}


def test_charges_follow_titles_new_ended_and_reused_processes():
    driver, worker, raylet, reused = (1, 0, "python -c"), (2, 0), (3, 7), (4, 1)
    samples = [
        (0.0, snapshot((*driver, 0.0), (*worker, "default_worker.py", 0.1), (*reused, "IDLE", 2.0))),  # starting
        (1.0, snapshot((*driver, 0.5), (*worker, "ReadLejepaRecords->MapBatches(lejepa_views)", 0.9), (4, 9, "IDLE", 0.1))),  # pid 4 restarted
        (2.0, snapshot((*driver, 1.0), (*worker, "IDLE", 1.0), (*raylet, "raylet", 0.3))),
        (3.0, snapshot((*driver, 1.5), (*worker, "IDLE", 1.0))),  # raylet gone after t = 2
    ]
    charged = charge(samples, platform_group(root=1))
    assert charged.total() == pytest.approx({
        ("driver", "python -c"): 1.5,
        ("data_tasks", "ReadLejepaRecords->MapBatches(lejepa_views)"): 1.0,  # a worker's time is its task's, idle title or not
        ("ray", "IDLE"): 2.0 + 0.1,  # a reused pid is a new process: its 0.1 s, not -1.9 s
        ("ray", "raylet"): 0.3})  # all of a new process's time falls after the previous sample
    window = charged.between(0.5, 2.5)
    assert window == pytest.approx({("driver", "python -c"): 1.0, ("data_tasks", "ReadLejepaRecords->MapBatches(lejepa_views)"): 0.5,
                                    ("ray", "IDLE"): 0.05, ("ray", "raylet"): 0.3})  # half of pid 4's (0, 1]
    assert charged.data_processes.tolist() == [1, 1, 1, 1]
    assert charged.ended_between(0.0, 3.0) == 3  # both pid-4 processes and the raylet
    assert charged.ended_between(1.5, 3.0) == 1


@pytest.mark.parametrize(("title", "name"), [
    ("ray::IDLE" + " " * 40, "IDLE"),
    ("ray::SplitCoordinator.get ", "SplitCoordinator"),
    ("ray::ReadLejepaRecords->MapBatches(lejepa_views)", "ReadLejepaRecords->MapBatches(lejepa_views)"),
    ("/venv/bin/python /venv/ray/dashboard/dashboard.py --logging-level=info", "dashboard.py"),
    ('ray-dashboard-ServeHead-0 (/venv/bin/python -B -c "from multiprocessing"', "ray-dashboard-ServeHead-0"),
    ("/venv/ray/core/src/ray/raylet/raylet --raylet_socket_name=x", "raylet"),
    ("/venv/bin/python -B -c from multiprocessing.forkserver import main", "python -c"),
])
def test_process_names(title, name):
    assert process_name(title) == name


def test_groups_of_the_platform_side():
    group = platform_group(root=10)
    assert [group(10, "python -c"), group(11, "RayTrainWorker"), group(12, "ReadLejepaRecords->MapBatches(lejepa_views)"),
            group(14, "raylet"), group(15, "TrainController"), group(16, "IDLE")] == \
        ["driver", "trainer", "data_tasks", "ray", "ray", "ray"]


@pytest.mark.parametrize("argv", [
    ["bench", "step", "--seconds", "5"],
    ["bench", "e2e", "--repeats", "0"],
    ["bench", "e2e", "--seconds", "0"],
    ["bench", "e2e", "--workload", "imagenet"],
])
def test_bad_bench_options_exit_2_before_running(argv, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("lejepa: error: ")
