"""A pretraining on an autoscaling cluster, simulated on one machine.

The head offers 1 CPU; the run asks for 2 workers x 1 CPU (and its data tasks need CPUs besides), so
it can only run once the autoscaler has added nodes. The autoscaler uses Ray's fake multi-node
provider (nodes are local processes) and removes nodes idle for 0.2 minutes.
"""

from __future__ import annotations

import sys
import time

import pytest

from clusters import local_cluster, pretrain_on
from lejepa_platform.tracking import find_run, metric_history
from test_pretrain import tiny_config

pytestmark = pytest.mark.e2e

STEPS = 6
MAX_WORKER_NODES = 3
IDLE_TIMEOUT_MIN = 0.2


def test_autoscaler_adds_nodes_for_the_run_and_removes_them_after(tmp_path):
    cfg = tiny_config(tmp_path, "train.name=autoscaled", f"train.steps={STEPS}", "train.workers=2",
                      "train.cpus_per_worker=1")
    autoscaling = {"worker_cpus": 1, "max_workers": MAX_WORKER_NODES, "idle_timeout_minutes": IDLE_TIMEOUT_MIN}
    with local_cluster(num_cpus=1, autoscaling=autoscaling) as cluster:
        assert cluster.alive_nodes() == 1
        with cluster.node_counts() as samples:
            started = time.time()
            summary = pretrain_on(cluster, cfg, tmp_path)
            finished = time.time()
            deadline = time.monotonic() + 60 * IDLE_TIMEOUT_MIN + 60
            while time.monotonic() < deadline and not (samples and samples[-1][0] > finished and samples[-1][1] == 1):
                time.sleep(0.5)
        during = [(at, count) for at, count in samples if at <= finished]
        after = [count for at, count in samples if at > finished]
    print(f"alive nodes over time (s since the driver started): {timeline(samples, started)}; "
          f"run finished at {finished - started:.0f} s", file=sys.stderr)

    assert summary["steps"] == STEPS
    assert [step for step, _ in metric_history(cfg.track.uri, summary["mlflow_run_id"], "loss/total")] == \
        list(range(1, STEPS + 1))
    assert find_run(cfg.track.uri, summary["mlflow_run_id"])["status"] == "FINISHED"
    assert 2 <= max(held(during), default=0) <= 1 + MAX_WORKER_NODES, f"node counts during the run: {timeline(during, started)}"
    assert after and after[-1] == 1, f"idle nodes were not removed; node counts after the run: {after}"


def held(samples: list[tuple[float, int]], *, at_least_s: float = 2.0) -> list[int]:
    """The node counts that lasted at least `at_least_s` (from their first sample to the next change).

    The counts are the GCS's ALIVE nodes, which lag the autoscaler's own view: the fake provider
    forgets a node as soon as it terminates it, but the node stays ALIVE until its raylet has shut
    down, and a node launched in that window shows one over max_workers for a moment (CI once saw
    "4@63 5@73 4@74"). A count that lasts is one the autoscaler really kept."""
    changes = [i for i in range(len(samples)) if i == 0 or samples[i][1] != samples[i - 1][1]]
    ends = [samples[j][0] for j in changes[1:]] + [samples[-1][0]]
    return [samples[i][1] for i, end in zip(changes, ends) if end - samples[i][0] >= at_least_s]


def timeline(samples: list[tuple[float, int]], start: float) -> str:
    """Each change of the node count as "count@seconds"."""
    changes = [(at, count) for i, (at, count) in enumerate(samples) if i == 0 or count != samples[i - 1][1]]
    return " ".join(f"{count}@{at - start:.0f}" for at, count in changes)
