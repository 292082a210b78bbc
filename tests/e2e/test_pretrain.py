"""End to end on a real local Ray cluster and a real SQLite MLflow store: tiny runs, real data.

Each run logs every step (log_every = 1), so "exactly once" is checked on the full step range.
Killed workers and crashed runs are tested where their resume is checked too: test_exact_resume.py
(workers killed mid-epoch, a stopped driver resumed) and test_multinode.py (a crashed run resumed
in the same MLflow run).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from lejepa_platform.config import RunConfig
from lejepa_platform.overrides import apply_overrides
from lejepa_platform.defaults import default_run_config
from lejepa_platform.errors import UserError
from lejepa_platform.tracking import find_run, metric_history
from lejepa_platform.run import launch
from lejepa_platform.run.launch import pretrain, pretrain_from_cli
from lejepa_platform.train.step import lr_factor

pytestmark = pytest.mark.e2e

STEPS = 20


def tiny_config(tmp_path: Path, *extra: str) -> RunConfig:
    """Two CPU workers, a 2-block ViT on 16 px views, every step logged, no time budget."""
    return apply_overrides(default_run_config(), [
        'model.backbone_kwargs={"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}',
        "model.proj_hidden_dim=64", "model.proj_dim=16",
        "loss.num_slices=64", "data.global_views=2", "data.global_size=16", "data.local_views=2",
        "data.local_size=8", "data.batch_size=32", "data.shuffle_buffer=64",
        f"train.steps={STEPS}", "train.time_budget_s=0", "train.log_every=1", "train.checkpoint_every=5", "train.workers=2",
        "train.cpus_per_worker=0.5", "train.torch_threads=1", "train.lr=1e-3", "train.warmup_frac=0.1",
        f"train.storage_path={tmp_path / 'runs'}", f"track.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "track.experiment=e2e", "eval.enabled=false", *extra])


def logged_steps(cfg: RunConfig, run_id: str, key: str = "loss/total") -> list[int]:
    """Every step at which `key` was written, duplicates included (read from the store directly)."""
    import mlflow

    return sorted(m.step for m in mlflow.MlflowClient(cfg.track.uri).get_metric_history(run_id, key))


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has persisted for this run."""
    steps = []
    for state in run_dir.glob("checkpoint_*/state.pt"):
        steps.append(int(torch.load(state, weights_only=True)["step"]))
    return sorted(steps)


def test_pretrain_two_workers_logs_every_step_once_and_learns(ray_cluster, tmp_path):
    cfg = tiny_config(tmp_path, "train.name=basic")
    summary = pretrain(cfg, quiet=True)

    assert summary["steps"] == STEPS
    run = find_run(cfg.track.uri, summary["mlflow_run_id"])
    assert run["status"] == "FINISHED"
    for key in ("loss/total", "loss/prediction", "loss/sigreg", "sigreg/view0", "sigreg/view3", "lr",
                "throughput/images_per_s", "embed/std", "probe/online_acc"):
        assert logged_steps(cfg, summary["mlflow_run_id"], key) == list(range(1, STEPS + 1)), key
    losses = [v for _, v in metric_history(cfg.track.uri, summary["mlflow_run_id"], "loss/total")]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert run["params"]["loss.num_slices"] == "64" and run["params"]["train.workers"] == "2"
    assert checkpoint_steps(tmp_path / "runs" / "basic") == [15, 20]  # keep_checkpoints = 2
    artifacts = {f.path for f in MlflowClient(cfg.track.uri).list_artifacts(run["run_id"])}
    assert {"backbone.safetensors", "config.json", "loss_curve.png", "ray_data_stats.txt"} <= artifacts
    stats = Path(MlflowClient(cfg.track.uri).download_artifacts(run["run_id"], "ray_data_stats.txt", str(tmp_path)))
    text = stats.read_text()  # Ray Data's own stats() of each rank's stream
    assert "# rank 0:" in text and "# rank 1:" in text and "ReadLejepaRecords->MapBatches(lejepa_views)" in text
    assert run["metrics"]["data/rows_per_s"] > 0 and run["metrics"]["data/task_cpu_s"] > 0
    assert run["metrics"]["data/trainer_wait_s"] >= 0 and run["metrics"]["data/backpressure_s"] >= 0
    assert run["metrics"]["data/records_read"] >= STEPS * 32 and run["metrics"]["data/records_skipped"] == 0


def test_views_augmented_on_the_trainers_device_train_the_exact_steps(ray_cluster, tmp_path):
    cfg = tiny_config(tmp_path, "train.name=on-device", "data.augment_on=device", "train.steps=8",
                      "train.checkpoint_every=4")
    summary = pretrain(cfg, quiet=True)

    assert summary["steps"] == 8
    assert find_run(cfg.track.uri, summary["mlflow_run_id"])["status"] == "FINISHED"
    assert find_run(cfg.track.uri, summary["mlflow_run_id"])["params"]["data.augment_on"] == "device"
    assert logged_steps(cfg, summary["mlflow_run_id"]) == list(range(1, 9))


def test_time_budget_ends_the_run_on_time_through_the_whole_schedule(ray_cluster, tmp_path, monkeypatch):
    budget, lr = 6.0, 1e-3
    # a checkpoint only at the end: one every 5 steps takes longer than the steps between (a second or two)
    cfg = tiny_config(tmp_path, "train.name=budget", "train.steps=100000", f"train.time_budget_s={budget}",
                      "train.checkpoint_every=100000")
    summary = pretrain(cfg, quiet=True)

    steps = summary["steps"]
    assert summary["stopped_by"] == "time budget" and 5 < steps < 100000
    assert budget - 1.0 < summary["train_seconds"] < budget + 2.0
    assert logged_steps(cfg, summary["mlflow_run_id"]) == list(range(1, steps + 1))
    lrs = [v for _, v in metric_history(cfg.track.uri, summary["mlflow_run_id"], "lr")]
    assert lrs[-1] == pytest.approx(lr * lr_factor(99999, cfg))  # the schedule's last value
    peak = lrs.index(max(lrs))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))  # cosine decay paced by time
    seconds = [v for _, v in metric_history(cfg.track.uri, summary["mlflow_run_id"], "train/seconds")]
    assert seconds == sorted(seconds) and seconds[-1] == pytest.approx(summary["train_seconds"], abs=0.1)
    final = torch.load(sorted((tmp_path / "runs" / "budget").glob("checkpoint_*/state.pt"))[-1], weights_only=True)
    assert final["step"] == steps and final["finished"]

    monkeypatch.setattr(launch, "fit", lambda *_, **__: pytest.fail("Train workers started for a finished run"))
    again = pretrain_from_cli(None, overrides=[f"train.storage_path={cfg.train.storage_path}"], resume="budget",
                              address=None, quiet=True)
    assert again["steps"] == steps  # a finished run resumed trains no further
    assert logged_steps(cfg, summary["mlflow_run_id"]) == list(range(1, steps + 1))


@pytest.mark.parametrize("override, message", [
    ("model.backbone=vit_tiny_patch16_2244", "vit_tiny_patch16_224"),
    ("train.workers=8", "CPUs"),
    ("data.source=/nonexistent/shards", "/nonexistent/shards"),
])
def test_bad_input_fails_before_any_worker_starts(ray_cluster, tmp_path, override, message):
    cfg = tiny_config(tmp_path, "train.name=bad")
    if override.startswith("train.workers"):
        cfg = apply_overrides(cfg, ["data.batch_size=64"])
    started = time.monotonic()
    with pytest.raises(UserError, match=message):
        pretrain(apply_overrides(cfg, [override]), quiet=True)
    assert time.monotonic() - started < 10
    assert not (tmp_path / "runs" / "bad").exists()
