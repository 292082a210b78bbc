"""Outages a cluster sees and a laptop does not, each with its expected outcome, against the real
S3 API and MLflow server of the `cloud` fixture (data and checkpoints in the bucket). The MLflow
server restarted mid-run is part of test_cloud_path's journey; here:

- one run through two outages at once: the object store unreachable for FREEZE_S right after the
  first checkpoint (so the next one is written into it, and data reads fail too), and the MLflow
  server killed for good once it holds the first rows. Expected: Ray Train retries, or restarts
  the workers from the last complete checkpoint, on the very same images; training finishes and
  checkpoints without the server; the rows MLflow lacks stay in the final checkpoint and one line
  says how to record them; that `--resume`, once the server is back, leaves every step in MLflow
  exactly once and the run FINISHED.
- a worker node removed mid-run: the run continues from its last checkpoint on the remaining node.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from clusters import NO_EGRESS, local_cluster, pretrain_on, run_on, stop_groups, train_worker_processes
from lejepa_platform.defaults import default_run_config
from lejepa_platform.overrides import apply_overrides
from lejepa_platform.run.storage import local_checkpoint
from lejepa_platform.tracking import find_run
from lejepa_platform.train.checkpoint import load_checkpoint
from lejepa_platform.train.loop import RECORD_IDS_ENV
from test_cloud_path import (RUNS, TINY, lejepa, logged, one_document, registered_steps, run_id_of,
                             server_back_afterwards, server_outage, sets, shards_built, when)
from test_exact_resume import steps_of

pytestmark = pytest.mark.e2e

__all__ = ["shards_built"]  # the module fixture, shared with test_cloud_path

FREEZE_S = 20.0
"""How long the object store does not answer: longer than pyarrow's S3 client retries a request."""


@pytest.fixture(scope="module")
def hiccups(cloud, shards_built, tmp_path_factory) -> dict:
    """The run through both outages, the server started again afterwards, then `--resume`."""
    ids = tmp_path_factory.mktemp("hiccups-ids")
    frozen = threading.Event()

    def freeze() -> None:
        with cloud.moto.frozen():
            frozen.set()
            time.sleep(FREEZE_S)

    with pytest.MonkeyPatch.context() as env, server_back_afterwards(cloud.server):
        env.setenv(RECORD_IDS_ENV, str(ids))
        freezer = when(lambda: registered_steps(cloud.s3, "hiccups"), freeze)
        outage = server_outage(cloud, "hiccups", after_step=0, back=False)
        finished = lejepa("pretrain", "--json", *sets("train.name=hiccups", "train.max_failures=4", "track.wait_s=2",
                                                       f"track.uri={cloud.server.uri}"))
        freezer.join(timeout=60)
    with local_checkpoint(f"{RUNS}/hiccups") as directory:
        final = load_checkpoint(directory)[0]
    run_id = run_id_of(cloud.s3, "hiccups")
    before = logged(cloud.server.uri, run_id)
    status_before = find_run(cloud.server.uri, run_id)["status"]
    recorded = lejepa("pretrain", "--json", "--resume", "hiccups", f"--set=train.storage_path={RUNS}")
    return {"finished": finished, "recorded": recorded, "final": final, "run_id": run_id, "before": before,
            "status_before": status_before, "frozen": frozen.is_set(), "outage": outage, "ids": ids}


def test_object_store_unreachable_while_a_checkpoint_is_written(cloud, hiccups):
    """No half-written checkpoint is loaded and no step is lost: every step was trained, a step
    trained again (after a restart) saw the same images, and each restart began right after a
    registered checkpoint."""
    assert hiccups["frozen"]
    steps = steps_of(hiccups["ids"])  # asserts that a step trained twice saw the same images
    assert sorted(step for _, step in steps) == list(range(1, 21))
    trained = [json.loads(line)["step"] for line in (hiccups["ids"] / "rank-0.jsonl").read_text().splitlines()]
    restarts = [later for earlier, later in zip(trained, trained[1:]) if later != earlier + 1]
    assert all((step - 1) % 5 == 0 for step in restarts)
    assert registered_steps(cloud.s3, "hiccups") == [15, 20]
    assert (hiccups["final"].step, hiccups["final"].finished) == (20, True)


def test_mlflow_server_that_never_returns_keeps_the_rows_for_resume(cloud, hiccups):
    """Training finished and checkpointed without the server; one line says how to record the run;
    the final checkpoint holds every row MLflow lacks; `--resume` records them, each step once."""
    finished = hiccups["finished"]
    assert finished.code == 1 and finished.out == "" and "Traceback" not in finished.err
    lines = [line for line in finished.err.splitlines() if line.startswith("lejepa:")]
    assert len(lines) == 1 and "did not answer for 2 s" in lines[0]
    assert lines[0].endswith(f"record the run with: lejepa pretrain --resume hiccups --set train.storage_path={RUNS}")
    before = hiccups["before"]
    assert before == list(range(1, len(before) + 1)) and len(before) < 20  # delivered before the kill
    pending = [int(row["step"]) for row in hiccups["final"].pending_metrics]
    assert pending == list(range(pending[0], 21)) and pending[0] <= len(before) + 1
    assert hiccups["status_before"] == "RUNNING"  # nobody could tell the server otherwise

    recorded = one_document(hiccups["recorded"])
    assert recorded["steps"] == 20 and recorded["mlflow_run_id"] == hiccups["run_id"]
    assert find_run(cloud.server.uri, hiccups["run_id"])["status"] == "FINISHED"
    for key in ("loss/total", "lr"):
        assert logged(cloud.server.uri, hiccups["run_id"], key) == list(range(1, 21)), key


_HELPER_ACTORS = """
import json
from ray.util.state import list_actors, list_nodes
head = next(n.node_id for n in list_nodes(filters=[("is_head_node", "=", True)]))
actors = [a for a in list_actors(limit=1000) if a.class_name in ("ProgressBoard", "_Tally")]
print(json.dumps({"head": head, "placed": [a.node_id for a in actors]}))
"""
"""The nodes of the driver's helper actors (a run's progress board and record tally): they ask for no
CPU, so unless pinned they may land on the node that is removed and take the run down with them."""


def test_worker_node_removed_mid_run_continues_on_the_remaining_node(cloud, shards_built, tmp_path):
    """A head without CPUs (as cluster.yaml's) and two 2-CPU worker nodes; the node running the
    Ray Train worker is stopped once a checkpoint is registered, and the run goes on on the other."""
    cfg = apply_overrides(default_run_config(), [*TINY, "train.name=node-lost", "train.steps=12",
                                                 "train.checkpoint_every=4", f"track.uri={cloud.server.uri}"])
    workers: dict[int, int] = {}
    removed: list[int] = []
    with local_cluster(num_cpus=0, env={**cloud.env, **NO_EGRESS}) as cluster:
        cluster.add_nodes(2, 2)

        def watch() -> None:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                current = train_worker_processes(cluster)
                workers.update(current)
                if current and not removed and registered_steps(cloud.s3, "node-lost"):
                    removed.append(next(iter(current.values())))
                    stop_groups(removed)
                if removed and set(current.values()) - set(removed):
                    return
                time.sleep(0.1)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        summary = pretrain_on(cluster, cfg, tmp_path)
        watcher.join(timeout=30)
        helpers = run_on(cluster, _HELPER_ACTORS, None)
    assert removed, "no node was removed: the run ended before its first checkpoint was registered"
    assert summary.get("steps") == 12, summary
    assert helpers["placed"] == [helpers["head"], helpers["head"]]  # the driver's helpers live on its node
    nodes = set(workers.values())
    assert len(nodes) == 2 and removed[0] in nodes  # the worker ran on the removed node, then on the other
    assert find_run(cloud.server.uri, summary["mlflow_run_id"])["status"] == "FINISHED"
    assert logged(cloud.server.uri, summary["mlflow_run_id"]) == list(range(1, 13))
