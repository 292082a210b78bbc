"""Exact resume on a real local Ray cluster: killed workers and a stopped driver continue from the
rows their checkpoint recorded, so every epoch consumes the same image ids as an uninterrupted run.

The ids come from the runs themselves: with LEJEPA_RECORD_IDS set, every rank writes the record
ids of each step it trains (replayed steps after a restart are written again).
"""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from clusters import kill_workers_after, registered_checkpoint_steps

from lejepa_platform import cli
from lejepa_platform.config import RunConfig
from lejepa_platform.overrides import apply_overrides
from lejepa_platform.data.shards import build_shards, resolve_source
from lejepa_platform.defaults import default_run_config
from lejepa_platform.tracking import find_run
from lejepa_platform.run.launch import pretrain
from lejepa_platform.train.loop import RECORD_IDS_ENV
from lejepa_platform.run.storage import read_run_record

pytestmark = pytest.mark.e2e

STEPS = 30
EPOCH_STEPS = 12
"""384 training images in batches of 32: each epoch ends mid-run, and checkpoints fall inside epochs."""


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """512 real images of the embedded dataset in 8 shards with a fixed split: 384 train / 128 test."""
    root = tmp_path_factory.mktemp("resume-data")
    table = pq.ParquetFile(resolve_source("builtin:fashion-mnist-10k") / "part-00000.parquet").read_row_groups([0, 1])
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(png))) for png in table.column("image").to_pylist()])
    np.savez(root / "d.npz", images=pixels, labels=table.column("label").to_numpy())
    summary = build_shards(str(root / "d.npz"), str(root / "shards"), rows_per_shard=64, test_fraction=0.25)
    assert summary["split"]["rows"]["train"] == 384
    return root / "shards"


def resume_overrides(tmp_path: Path, shards: Path, name: str) -> list[str]:
    """Two CPU workers, a 2-block ViT on 16 px views, one shuffle window per 64-row unit."""
    return [
        'model.backbone_kwargs={"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}',
        "model.proj_hidden_dim=64", "model.proj_dim=16", "loss.num_slices=64",
        f"data.source={shards}", "data.global_views=2", "data.global_size=16", "data.local_views=0",
        "data.batch_size=32", "data.shuffle_buffer=64",
        f"train.steps={STEPS}", "train.time_budget_s=0", "train.log_every=1", "train.checkpoint_every=5",
        "train.workers=2", "train.cpus_per_worker=0.5", "train.torch_threads=1", "train.max_failures=3",
        f"train.name={name}", f"train.storage_path={tmp_path / 'runs'}",
        f"track.uri=sqlite:///{tmp_path / 'mlflow.db'}", "track.experiment=resume", "eval.enabled=false"]


def resume_config(tmp_path: Path, shards: Path, name: str) -> RunConfig:
    return apply_overrides(default_run_config(), resume_overrides(tmp_path, shards, name))


def steps_of(ids_dir: Path) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """{(rank, step): [(epoch, id), ...]}; a step written twice (replayed after a restart) must match."""
    steps: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for path in sorted(ids_dir.glob("rank-*.jsonl")):
        rank = int(path.stem.split("-")[1])
        for line in path.read_text().splitlines():
            row = json.loads(line)
            pairs = list(zip(row["epoch"], row["uid"]))
            previous = steps.setdefault((rank, row["step"]), pairs)
            assert previous == pairs, f"rank {rank} step {row['step']} saw other images when replayed"
    return steps


def per_epoch(steps: dict[tuple[int, int], list[tuple[int, int]]]) -> dict[int, Counter]:
    epochs: dict[int, Counter] = defaultdict(Counter)
    for pairs in steps.values():
        for epoch, uid in pairs:
            epochs[epoch][uid] += 1
    return dict(epochs)


def logged_steps(cfg: RunConfig, run_id: str) -> list[int]:
    import mlflow

    return sorted(m.step for m in mlflow.MlflowClient(cfg.track.uri).get_metric_history(run_id, "loss/total"))


def record_ids(monkeypatch, tmp_path: Path, name: str) -> Path:
    directory = tmp_path / f"ids-{name}"
    monkeypatch.setenv(RECORD_IDS_ENV, str(directory))
    return directory


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, shards, tmp_path_factory) -> dict[tuple[int, int], list[tuple[int, int]]]:
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    ids = tmp_path / "ids"
    os.environ[RECORD_IDS_ENV] = str(ids)
    try:
        summary = pretrain(resume_config(tmp_path, shards, "plain"), quiet=True)
    finally:
        del os.environ[RECORD_IDS_ENV]
    assert summary["steps"] == STEPS
    steps = steps_of(ids)
    assert sorted(steps) == [(rank, step) for rank in (0, 1) for step in range(1, STEPS + 1)]
    epochs = per_epoch(steps)
    # Two whole epochs: every training image exactly once in each, none from the test split.
    assert sorted(epochs)[:2] == [0, 1]
    assert epochs[0] == epochs[1] and len(epochs[0]) == 384 and set(epochs[0].values()) == {1}
    return steps


def test_workers_killed_twice_mid_epoch_consume_the_same_images(uninterrupted, shards, tmp_path, monkeypatch):
    ids = record_ids(monkeypatch, tmp_path, "killed")
    cfg = resume_config(tmp_path, shards, "killed")
    killed: list[int] = []
    watcher = kill_workers_after(tmp_path / "runs" / "killed", [7, 17], killed)  # checkpoints 10 and 20: mid-epoch
    summary = pretrain(cfg, quiet=True)
    watcher.join(timeout=5)

    assert len(killed) == 2, f"killed {len(killed)} workers: the run ended before the watcher saw its checkpoints"
    assert summary["steps"] == STEPS
    assert logged_steps(cfg, summary["mlflow_run_id"]) == list(range(1, STEPS + 1))
    steps = steps_of(ids)
    assert steps == uninterrupted  # the same images at every step of every rank
    assert per_epoch(steps) == per_epoch(uninterrupted)


def test_sigterm_to_the_driver_checkpoints_and_resumes_exactly(uninterrupted, shards, tmp_path, monkeypatch, capsys):
    ids = record_ids(monkeypatch, tmp_path, "stopped")
    cfg = resume_config(tmp_path, shards, "stopped")
    run_dir = tmp_path / "runs" / "stopped"
    args = ["pretrain", "--json", *[f"--set={o}" for o in resume_overrides(tmp_path, shards, "stopped")]]

    def stop_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not any(s >= 5 for s in registered_checkpoint_steps(run_dir)):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=stop_after_first_checkpoint, daemon=True)
    sender.start()
    code = cli.main(args)
    sender.join(timeout=5)
    err = capsys.readouterr().err

    assert code == 143
    assert "lejepa pretrain --resume stopped" in err
    stopped_at = max(step for _, step in steps_of(ids))
    assert 5 <= stopped_at < STEPS
    latest = max(registered_checkpoint_steps(run_dir))
    assert latest == stopped_at  # written at the step boundary where the request arrived
    run_id = read_run_record(cfg.train.storage_path, "stopped")["mlflow_run_id"]
    assert find_run(cfg.track.uri, run_id)["status"] == "KILLED"
    code = cli.main(["pretrain", "--json", "--resume", "stopped", f"--set=train.storage_path={cfg.train.storage_path}"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == STEPS
    assert summary["mlflow_run_id"] == run_id
    assert find_run(cfg.track.uri, summary["mlflow_run_id"])["status"] == "FINISHED"
    assert logged_steps(cfg, summary["mlflow_run_id"]) == list(range(1, STEPS + 1))
    steps = steps_of(ids)
    assert steps == uninterrupted
    assert per_epoch(steps) == per_epoch(uninterrupted)
    assert torch.load(sorted(run_dir.glob("checkpoint_*/state.pt"))[-1], weights_only=True)["step"] == STEPS

