"""A pretraining across nodes, simulated on one machine, tracked by a real MLflow server.

Three Ray nodes offer 1 CPU each; the run asks for 2 workers x 1 CPU, so its two workers cannot
share a node (the third CPU is left for the data tasks). Checkpoints go to one storage path that every
node sees, as a shared file system would on a real cluster. A worker is killed after the
first checkpoint with max_failures = 0, so the run fails; `--resume` then finishes it in the
same MLflow run, and every node can read the checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import pytest
from mlflow import MlflowClient

from clusters import local_cluster, mlflow_server, pretrain_on, run_on, watch_train_workers
from lejepa_platform.tracking import find_run
from lejepa_platform.train.checkpoint import STATE_FILE, load_checkpoint
from lejepa_platform.run.storage import read_run_record
from test_pretrain import tiny_config

pytestmark = pytest.mark.e2e

STEPS = 6
KILL_AT = 3
"""A checkpoint every KILL_AT steps; a worker dies right after the first one is registered."""

_READ_ON_EVERY_NODE = """
import hashlib, json, sys
from pathlib import Path
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

@ray.remote(num_cpus=0)
def read(directory):
    from lejepa_platform.train.checkpoint import STATE_FILE, load_checkpoint
    state, _ = load_checkpoint(directory)
    return {"node": ray.get_runtime_context().get_node_id(), "directory": directory, "step": state.step,
            "sha256": hashlib.sha256((Path(directory) / STATE_FILE).read_bytes()).hexdigest()}

nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
reads = ray.get([read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(d)
                 for node in nodes for d in json.loads(sys.argv[1])])
print(json.dumps({"nodes": nodes, "reads": reads}))
"""


def logged(uri: str, run_id: str) -> list[tuple[int, float]]:
    """Every (step, loss) row the server holds, duplicates included, in step order."""
    from mlflow import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, "loss/total"))


def test_two_node_run_crashes_resumes_in_the_same_mlflow_run_and_checkpoints_read_on_every_node(tmp_path):
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(mlflow_server(tmp_path / "mlflow", wait=False))
        cluster = stack.enter_context(local_cluster(num_cpus=1))
        cluster.add_nodes(1, 1)
        server.wait_healthy()
        cfg = tiny_config(tmp_path, "train.name=multinode", f"train.steps={STEPS}", f"train.checkpoint_every={KILL_AT}",
                          "train.workers=2", "train.cpus_per_worker=1", "train.max_failures=0",
                          f"track.uri={server.uri}")
        run_dir = tmp_path / "runs" / "multinode"

        with watch_train_workers(cluster, kill_after=(run_dir, KILL_AT)) as first:
            crashed = pretrain_on(cluster, cfg, tmp_path)
        assert first.killed, "no worker was killed: the run finished before a checkpoint appeared"
        assert "multinode" in crashed.get("failed", ""), f"the run did not fail: {crashed}"
        run_id = read_run_record(cfg.train.storage_path, "multinode")["mlflow_run_id"]
        assert find_run(server.uri, run_id)["status"] == "FAILED"
        before_resume = logged(server.uri, run_id)  # rows reach MLflow after their checkpoint: maybe not yet
        assert [step for step, _ in before_resume] == list(range(1, len(before_resume) + 1))
        assert len(before_resume) <= KILL_AT

        with watch_train_workers(cluster) as second:
            resumed = pretrain_on(cluster, cfg, tmp_path, resume="multinode")
        checkpoints = sorted(str(p) for p in run_dir.glob("checkpoint_*") if p.is_dir())
        seen = run_on(cluster, _READ_ON_EVERY_NODE, checkpoints)
        run, after_resume = find_run(server.uri, run_id), logged(server.uri, run_id)
        artifacts = {f.path for f in MlflowClient(server.uri).list_artifacts(run_id)}

    assert resumed["mlflow_run_id"] == run_id and resumed["steps"] == STEPS
    assert [load_checkpoint(d)[0].step for d in checkpoints] == [KILL_AT, STEPS]  # keep_checkpoints = 2
    assert run["status"] == "FINISHED"
    assert [step for step, _ in after_resume] == list(range(1, STEPS + 1))  # each step exactly once
    assert after_resume[:len(before_resume)] == before_resume
    # The rows of steps 1..KILL_AT are the ones saved in the checkpoint: the resumed run did not redo them.
    state_at_kill = load_checkpoint(checkpoints[0])[0]
    assert after_resume[:KILL_AT] == [(int(r["step"]), r["loss/total"]) for r in state_at_kill.pending_metrics]
    assert {"config.json", "loss_curve.png"} <= artifacts
    assert list((tmp_path / "mlflow" / "artifacts").rglob("loss_curve.png")), "artifacts bypassed the server"

    for watch in (first, second):  # 1-CPU nodes: the two workers of each run are on two nodes
        assert len(watch.workers) == 2 and len(set(watch.workers.values())) == 2, watch.workers
    assert not set(first.workers) & set(second.workers)  # the resumed run started new workers

    assert len(seen["nodes"]) == 3
    expected = {d: (load_checkpoint(d)[0].step, hashlib.sha256((Path(d) / STATE_FILE).read_bytes()).hexdigest())
                for d in checkpoints}
    assert {(r["node"], r["directory"]) for r in seen["reads"]} == {(n, d) for n in seen["nodes"] for d in checkpoints}
    assert all((r["step"], r["sha256"]) == expected[r["directory"]] for r in seen["reads"])
