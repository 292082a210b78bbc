"""The Ray pipeline on a real local cluster: exact row counts per epoch and split, reproducible
views in a fixed order, bad records skipped and counted without failing a task, folders and tars
read directly, ranks reading disjoint parts, a stream resumed at a position, and a stream that
stays a bounded distance ahead of a slow consumer."""

import hashlib
import io
import logging
import tarfile
import time
from collections import Counter

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lejepa_platform.config import DataConfig
from lejepa_platform.data.pipeline import VIEW_OPERATOR, DataStats, rank_batches, rank_blocks, stream_block_rows
from lejepa_platform.data.reader import plan_source
from lejepa_platform.data.stream import StreamPosition
from lejepa_platform.data.shards import build_shards
from lejepa_platform.data.views import normalize
from lejepa_platform.errors import UserError

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def small(tmp_path_factory, fmnist_sample):
    """60 real images in 4 shards with a fixed split: 45 train / 15 test."""
    root = tmp_path_factory.mktemp("small")
    np.savez(root / "d.npz", images=fmnist_sample["pixels"], labels=fmnist_sample["labels"])
    summary = build_shards(str(root / "d.npz"), str(root / "shards"), rows_per_shard=16, test_fraction=0.25)
    assert summary["split"]["rows"] == {"train": 45, "test": 15}
    return root / "shards"


def config(source, **kw):
    base = dict(source=str(source), global_views=2, global_size=32, local_views=2, local_size=16, batch_size=8)
    return DataConfig(**{**base, **kw})


def train_stream(cfg, **kw):
    return rank_blocks(plan_source(cfg.source, cfg.split), cfg, **kw)


def count_rows(cfg):
    return plan_source(cfg.source, cfg.split).rows


def blocks(stream):
    return list(stream)


def column(batches, key):
    return np.concatenate([b[key] for b in batches])


def view_hashes(batches):
    return Counter(hashlib.sha1(row.tobytes()).hexdigest() for b in batches for row in b["global"])


def test_epochs_splits_shapes_and_reproducible_views(ray_cluster, small):
    cfg = config(small)
    assert count_rows(cfg) == 45 and count_rows(config(small, split="test")) == 15
    two = blocks(train_stream(cfg, seed=0, epochs=2))
    labels = np.concatenate([b["label"] for b in two])
    assert len(labels) == 90  # two epochs of the 45 train rows, nothing else
    again = blocks(train_stream(cfg, seed=0, epochs=2))
    for key in ("global", "local", "label", "uid", "item", "row"):
        assert np.array_equal(column(two, key), column(again, key)), key  # same rows, same order
    first = blocks(train_stream(cfg, seed=0, epochs=1))
    train_labels = Counter(np.concatenate([b["label"] for b in first]).tolist())
    assert Counter(labels.tolist()) == Counter({k: 2 * v for k, v in train_labels.items()})
    b = two[0]
    assert b["global"].shape[1:] == (2, 3, 32, 32) and b["global"].dtype == np.uint8
    assert b["local"].shape[1:] == (2, 3, 16, 16) and b["label"].dtype == np.int64
    both, one = view_hashes(two), view_hashes(first)
    assert sum(one.values()) == 45 and both & one == one  # epoch 0 again: the very same views
    assert sum((both - one).values()) == 45 and not set(both - one) & set(one)  # epoch 1: all new views
    test = blocks(train_stream(config(small, split="test", local_views=0), seed=0, epochs=1))
    assert sum(len(x["label"]) for x in test) == 15 and "local" not in test[0]


def bad_shard(root, fmnist_sample, image_tools):
    """100 records: 3 truncated, 2 garbage (5 %) and one header claiming 30000 x 30000."""
    pngs = [fmnist_sample["png"][i % 60] for i in range(100)]
    labels = [int(fmnist_sample["labels"][i % 60]) for i in range(100)]
    for i in (7, 31, 64):
        pngs[i] = pngs[i][: len(pngs[i]) // 2]
    pngs[12], pngs[50] = b"\x00" * 300, b"GIF89a garbage"
    pngs[90] = image_tools.bomb(30000, 30000)
    root.mkdir()
    table = pa.table({"image": pa.array(pngs, pa.binary()), "label": pa.array(labels, pa.int64()),
                      "id": pa.array([f"bad/{i:03d}" for i in range(100)], pa.string())})
    pq.write_table(table, root / "part-00000.parquet", row_group_size=40)
    good = [lab for i, lab in enumerate(labels) if i not in (7, 31, 64, 12, 50, 90)]
    return Counter(good)


def test_bad_records_are_skipped_counted_and_logged_once(ray_cluster, tmp_path, fmnist_sample, image_tools, caplog):
    expected = bad_shard(tmp_path / "bad", fmnist_sample, image_tools)
    started_ms = time.time() * 1000
    stats = DataStats()
    cfg = config(tmp_path / "bad", split="all", global_views=4, local_views=0)
    got = blocks(train_stream(cfg, seed=0, epochs=1, stats=stats))
    assert Counter(np.concatenate([b["label"] for b in got]).tolist()) == expected  # exactly the 94 good ones
    with caplog.at_level(logging.INFO, logger="lejepa_platform.data"):
        summary = stats.log_summary()
    assert summary["records"] == 100 and summary["skipped"] == 6
    assert summary["reasons"] == {"truncated": 3, "undecodable": 2, "too_large": 1}
    lines = [r for r in caplog.records if r.name == "lejepa_platform.data"]
    assert len(lines) == 1 and "skipped 6" in lines[0].getMessage()
    from ray.util.state import list_tasks

    failed = list_tasks(address=ray_cluster.get_runtime_context().gcs_address, filters=[("state", "=", "FAILED")],
                        raise_on_missing_output=False)
    # this stream's tasks only: the session's cluster also ran runs that other tests killed
    assert not [t for t in failed if VIEW_OPERATOR in (t.name or "") and (t.creation_time_ms or 0) >= started_ms]


def test_ranks_read_disjoint_parts_and_resume_at_their_position(ray_cluster, small):
    cfg = config(small, local_views=0, shuffle_buffer=1)
    parts = [blocks(train_stream(cfg, seed=1, epochs=2, rank=r, world=2)) for r in (0, 1)]
    uids = [column(p, "uid") for p in parts]
    assert len(uids[0]) + len(uids[1]) == 90 and Counter(np.concatenate(uids).tolist()) == Counter(
        {uid: 2 for uid in set(np.concatenate(uids).tolist())})  # every image twice: once per epoch
    items = [set(column(p, "item").tolist()) for p in parts]
    assert not items[0] & items[1] and {i % 2 for i in items[1]} == {1}
    whole = parts[1]
    cut = 20  # somewhere inside an item: resume after the row at index cut - 1
    item, row = int(column(whole, "item")[cut - 1]), int(column(whole, "row")[cut - 1])
    rest = blocks(train_stream(cfg, seed=1, epochs=2, rank=1, world=2, position=StreamPosition().after(item, row)))
    for key in ("global", "label", "uid", "item", "row"):
        assert np.array_equal(column(rest, key), column(whole, key)[cut:]), key
    plan = plan_source(cfg.source, cfg.split)
    batches = list(rank_batches(plan, cfg, seed=1, epochs=1, batch_rows=4))
    assert len(batches) == 45 // 4  # the last partial batch is dropped
    for key in ("global", "uid", "item", "row"):  # the blocks' rows, in order, cut into batches
        assert np.array_equal(np.concatenate([np.asarray(b[key]) for b in batches]),
                              column(blocks(train_stream(cfg, seed=1, epochs=1)), key)[:44]), key
    for batch in batches:
        assert batch["global"].shape == (4, 2, 3, 32, 32) and batch["global"].dtype == torch.uint8
        assert normalize(batch["global"]).dtype == torch.float32


def finished_view_tasks(ray_cluster) -> int:
    from ray.util.state import list_tasks

    tasks = list_tasks(address=ray_cluster.get_runtime_context().gcs_address, limit=10_000,
                       filters=[("state", "=", "FINISHED")], raise_on_missing_output=False)
    return sum(VIEW_OPERATOR in (t.name or "") for t in tasks)


def test_the_stream_stays_a_bounded_distance_ahead_of_a_slow_consumer(ray_cluster):
    built, rows = {}, {}
    for prefetch in (1, 4):
        cfg = DataConfig(global_views=4, global_size=32, local_views=0, batch_size=128, prefetch_batches=prefetch)
        time.sleep(2)  # the state API hears of finished tasks about a second late
        before = finished_view_tasks(ray_cluster)
        batches = rank_batches(plan_source(cfg.source, cfg.split), cfg, seed=0, epochs=4, batch_rows=128)
        assert sum(len(next(batches)["uid"]) for _ in range(4)) == 512
        time.sleep(6)  # a slow trainer: the data side has to wait for it
        built[prefetch], rows[prefetch] = finished_view_tasks(ray_cluster) - before, stream_block_rows(cfg, 128)
        batches.close()
    # A budget of two blocks of 64 rows (prefetch 1) or 256 rows (prefetch 4), in 400-row items: the
    # blocks the 512 consumed rows came from (at most one per item more than full blocks would
    # take), the two the budget holds and the one the iterator prefetches. Unbounded, the stream
    # would have built all 4 epochs by now.
    assert rows == {1: 64, 4: 256}
    assert 512 // 64 + 2 <= built[1] <= 512 // 64 + 2 + 2 + 1, built
    assert 512 // 256 + 2 <= built[4] <= 512 // 256 + 2 + 2 + 1, built


def test_image_folder_and_webdataset_read_directly(ray_cluster, class_folder, tmp_path, fmnist_sample, caplog):
    with caplog.at_level(logging.WARNING, logger="lejepa_platform.data"):
        got = blocks(train_stream(config(class_folder), seed=0, epochs=1))
    assert "no fixed train/test split" in caplog.text  # train falls back to every row, with a warning
    assert Counter(np.concatenate([b["label"] for b in got]).tolist()) == {0: 4, 1: 4, 2: 4}
    with pytest.raises(UserError, match="no test split"):
        train_stream(config(class_folder, split="test"), seed=0, epochs=1)
    with tarfile.open(tmp_path / "data.tar", "w") as archive:
        for i in range(9):
            for name, data in ((f"k{i}.png", fmnist_sample["png"][i]), (f"k{i}.cls", str(i % 3).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    got = blocks(train_stream(config(tmp_path / "data.tar", split="all"), seed=0, epochs=1))
    assert Counter(np.concatenate([b["label"] for b in got]).tolist()) == {0: 3, 1: 3, 2: 3}


def test_builtin_counts_come_from_the_manifest():
    assert count_rows(DataConfig()) == 8000
    assert count_rows(DataConfig(split="test")) == 2000 and count_rows(DataConfig(split="all")) == 10_000


def test_the_stream_does_not_busy_poll_while_the_trainer_is_slower(ray_cluster):
    """The executor runs in the consumer's process; with a consumer slower than the views are built
    (a trainer sleeping 0.2 s a batch), that whole process stays under a tenth of a core. This pins
    `IdleBackoff`, which reads Ray Data internals: a Ray upgrade that changes them fails here."""
    cfg = DataConfig(global_views=4, global_size=32, local_views=0, batch_size=128)  # the default prefetch
    batches = rank_batches(plan_source(cfg.source, cfg.split), cfg, seed=0, epochs=20, batch_rows=128)
    for _ in range(3):  # past start-up: the first blocks are built while the consumer waits
        next(batches)
    process = psutil.Process()
    before, started = process.cpu_times(), time.perf_counter()
    for _ in range(40):
        assert len(next(batches)["uid"]) == 128
        time.sleep(0.2)
    after, seconds = process.cpu_times(), time.perf_counter() - started
    batches.close()
    cores = (after.user + after.system - before.user - before.system) / seconds
    assert cores < 0.1, f"the stream's process used {cores:.3f} of a core while the trainer slept"
