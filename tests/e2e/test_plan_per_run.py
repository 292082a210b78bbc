"""A whole run plans its source once, and a labelled image folder used directly trains the probe."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from lejepa_platform.data import reader
from lejepa_platform.defaults import default_run_config
from lejepa_platform.overrides import apply_overrides
from lejepa_platform.run.launch import pretrain

pytestmark = pytest.mark.e2e


def test_a_labelled_folder_run_plans_once_and_trains_the_online_probe(ray_cluster, tmp_path, fmnist_sample,
                                                                        image_tools, monkeypatch):
    folder = tmp_path / "folder"
    for i, (png, label) in enumerate(zip(fmnist_sample["png"], fmnist_sample["labels"])):
        (folder / f"class-{int(label)}").mkdir(parents=True, exist_ok=True)
        (folder / f"class-{int(label)}" / f"{i:03d}.png").write_bytes(png)
    opened = []
    original = reader.open_source
    monkeypatch.setattr(reader, "open_source", lambda source: opened.append(source) or original(source))
    cfg = apply_overrides(default_run_config(), [
        'model.backbone_kwargs={"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}',
        "model.proj_hidden_dim=32", "model.proj_dim=16", "loss.num_slices=32", f"data.source={folder}",
        "data.global_views=2", "data.global_size=16", "data.local_views=0", "data.batch_size=8",
        "data.shuffle_buffer=16", "train.steps=6", "train.time_budget_s=0", "train.log_every=1",
        "train.checkpoint_every=6", "train.workers=1", "train.cpus_per_worker=1", "train.torch_threads=1",
        f"train.storage_path={tmp_path / 'runs'}", f"track.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "track.experiment=plan", "train.name=folder", 'eval.protocols=["knn"]'])
    summary = pretrain(cfg, quiet=True)
    assert opened == [str(folder)]  # one plan for training, the end-of-run evaluation and the probe's classes
    assert summary["steps"] == 6 and summary["evaluation"]["split"] == "seeded"
    assert summary["evaluation"]["num_test"] == 12  # 20 % of each of the folder's classes, held out
    history = MlflowClient(cfg.track.uri).get_metric_history(summary["mlflow_run_id"], "probe/online_acc")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]  # the probe trained at every step
