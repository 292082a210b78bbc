"""The data tasks and the evaluation set read shards behind a URI: the same views and crops as from the local path.
The bucket (s3://bucket/... served from a local folder through a SubTreeFileSystem) exists only in
the driver, so the tasks must read through the filesystem the plan carries."""

import hashlib
import shutil
from collections import Counter

import numpy as np
import pyarrow.fs as pafs
import pytest

from lejepa_platform.config import DataConfig
from lejepa_platform.data.sources import base as sources
from lejepa_platform.data.evalset import load_eval_set
from lejepa_platform.data.pipeline import rank_blocks
from lejepa_platform.data.reader import plan_source
from lejepa_platform.data.shards import build_shards

pytestmark = pytest.mark.e2e


def rows_of(stream, column):
    """Counter of (row hash, label) over the whole stream (tasks may finish in any order)."""
    return Counter((hashlib.sha1(row.tobytes()).hexdigest(), int(label))
                   for b in stream
                   for row, label in zip(b[column], b["label"]))


def test_pipelines_read_a_bucket_like_the_local_path(ray_cluster, tmp_path, fmnist_sample, monkeypatch):
    np.savez(tmp_path / "d.npz", images=fmnist_sample["pixels"], labels=fmnist_sample["labels"])
    build_shards(str(tmp_path / "d.npz"), str(tmp_path / "shards"), rows_per_shard=16, test_fraction=0.25)
    shutil.copytree(tmp_path / "shards", tmp_path / "store" / "bucket" / "fm")
    bucket = pafs.SubTreeFileSystem(str(tmp_path / "store"), pafs.LocalFileSystem())
    monkeypatch.setattr(sources, "_from_uri", lambda uri: (bucket, uri[len("s3://"):]))
    base = dict(global_views=2, global_size=24, local_views=1, local_size=12, batch_size=8)
    local, remote = DataConfig(source=str(tmp_path / "shards"), **base), DataConfig(source="s3://bucket/fm", **base)
    remote_plan, local_plan = plan_source(remote.source, remote.split), plan_source(local.source, local.split)
    assert remote_plan.rows == local_plan.rows == 45
    views = rows_of(rank_blocks(remote_plan, remote, seed=1, epochs=1), "global")
    assert sum(views.values()) == 45 and views == rows_of(rank_blocks(local_plan, local, seed=1, epochs=1), "global")
    crops, local_crops = (load_eval_set(plan_source(where, "test"), 20) for where in ("s3://bucket/fm", local.source))
    assert len(crops.labels) == 15 and np.array_equal(crops.images, local_crops.images)
