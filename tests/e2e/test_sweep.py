"""Sweeps end to end on the session's local Ray cluster and a real SQLite MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from lejepa_platform.config import SweepConfig
from lejepa_platform.overrides import apply_overrides
from lejepa_platform.errors import UserError
from lejepa_platform.recipes import load_recipe
from lejepa_platform.sweep.tune import sweep
from lejepa_platform.tracking import SWEEP_TAG, search_runs

pytestmark = pytest.mark.e2e

TINY = [
    'base.model.backbone_kwargs={"img_size": 16, "patch_size": 8, "depth": 1}',
    "base.model.proj_hidden_dim=32", "base.model.proj_dim=16", "base.data.global_size=16",
    "base.data.batch_size=16", "base.data.shuffle_buffer=0", "base.train.steps=6", "base.train.log_every=2",
    "base.train.checkpoint_every=6", "base.train.torch_threads=1",
]


def smoke(tmp_path: Path, *extra: str) -> SweepConfig:
    """sweeps/smoke.py shrunk to seconds per trial, writing under tmp_path."""
    return apply_overrides(load_recipe("sweeps/smoke.py", SweepConfig), [
        *TINY, f"base.train.storage_path={tmp_path / 'runs'}", f"base.track.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "base.eval.enabled=false", *extra])


def test_asha_stops_the_trial_built_to_lose(ray_cluster, tmp_path):
    """lam = 0.9 makes the LeJEPA loss ~10x larger than lam = 0.01 from the first report on."""
    scfg = smoke(tmp_path, "name=asha", "scheduler=asha", "grace_reports=1", "reduction_factor=2",
                 "max_concurrent_trials=1", "base.train.steps=8", 'space={"loss.lam": {"grid": [0.01, 0.9]}}')
    summary = sweep(scfg, quiet=True)

    children = search_runs(scfg.base.track.uri, scfg.base.track.experiment, parent_run_id=summary["parent_run_id"])
    by_lam = {c["params"]["loss.lam"]: c for c in children}
    assert by_lam["0.01"]["status"] == "FINISHED"
    assert by_lam["0.9"]["status"] == "KILLED"


@pytest.mark.parametrize("override, message", [
    ('space={"loss.lamda": {"grid": [0.1]}}', "unknown config key 'loss.lamda'"),
    ("space={}", "sweep.space"),
    ('space={"model.backbone": {"grid": ["vit_tiny_patch16_224", "not_a_model"]}}', "not_a_model"),
    ("base.train.cpus_per_worker=2", "CPUs"),
])
def test_bad_sweeps_fail_before_any_trial(ray_cluster, tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        sweep(smoke(tmp_path, override), quiet=True)
    assert not (tmp_path / "runs" / "smoke").exists()


def test_killed_smoke_sweep_resumes_only_the_unfinished_trials_into_one_parent_with_the_analysis(ray_cluster,
                                                                                                 tmp_path):
    """sweeps/smoke.py's four trials; the driver (a `lejepa sweep` process on this cluster) is
    SIGKILLed once one trial has finished; `--resume` then completes the sweep without running that
    trial again, under the same parent run, with the analysis attached to it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    extra = ["name=resumable", "max_concurrent_trials=1"]
    scfg = smoke(tmp_path, *extra)
    uri, experiment = scfg.base.track.uri, scfg.base.track.experiment
    sets = [f"--set={o}" for o in [*TINY, f"base.train.storage_path={tmp_path / 'runs'}", f"base.track.uri={uri}",
                                   "base.eval.enabled=false", *(f"sweep.{o}" for o in extra)]]
    # the store exists before the driver starts: MLflow creates a SQLite store's tables without a lock,
    # so this test's first look and the driver's first write must not both create it
    MlflowClient(uri).search_experiments()
    driver = subprocess.Popen([sys.executable, "-m", "lejepa_platform.cli", "sweep", "sweeps/smoke.py", *sets,
                               "--address", ray_cluster.get_runtime_context().gcs_address, "--json"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        first_done = None
        deadline = time.monotonic() + 300
        while first_done is None and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(1)
            try:
                first_done = next((r for r in search_runs(uri, experiment) if r["status"] == "FINISHED"), None)
            except UserError:  # the experiment does not exist yet
                pass
        assert first_done is not None, "no trial finished before the deadline"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()

    summary = sweep(scfg, resume=True, quiet=True)
    parents = [r for r in search_runs(uri, experiment) if r["tags"].get(SWEEP_TAG) == "parent"]
    assert [p["run_id"] for p in parents] == [summary["parent_run_id"]]  # the resumed driver reused its parent
    children = search_runs(uri, experiment, parent_run_id=summary["parent_run_id"])
    assert len(children) == 4 and {c["status"] for c in children} == {"FINISHED"}
    assert len({c["name"] for c in children}) == 4  # one run per trial id: none started twice
    rerun = next(c for c in children if c["run_id"] == first_done["run_id"])
    assert rerun["end_time"] == first_done["end_time"]  # the finished trial was not run again
    combos = {(c["params"]["model.backbone"], c["params"]["loss.num_slices"]) for c in children}
    assert combos == {(b, s) for b in ("vit_tiny_patch16_224", "vit_small_patch16_224") for s in ("64", "256")}
    assert all(c["metrics"]["model/params"] > 0 for c in children)
    client = MlflowClient(uri)
    assert {"report.md", "analysis.json"} <= {Path(f.path).name for f in
                                              client.list_artifacts(summary["parent_run_id"], "analysis")}
