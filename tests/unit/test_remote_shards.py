"""Shards behind a URI: read through a pyarrow filesystem they give exactly what the local path gives
(rows, ids, labels, split, pixels, eval set, inspection), and `build_shards` to a URI uploads every
shard before the manifest. `file://` URIs and a fake `s3://bucket` (a local folder served through a
SubTreeFileSystem, so paths inside the filesystem are not local paths) stand in for object storage."""

import pickle
import shutil
import tempfile

import numpy as np
import pyarrow.fs as pafs
import pytest

from lejepa_platform.config import DataConfig
from lejepa_platform.data.shards import build as shards
from lejepa_platform.data.sources import base as sources
from lejepa_platform.data.evalset import load_eval_set
from lejepa_platform.data.reader import eval_blocks, plan_source
from lejepa_platform.data.stream import item_blocks, windows_per_epoch
from lejepa_platform.data.shards import build_shards, inspect_shards, read_manifest
from lejepa_platform.data.sources import ShardSource
from lejepa_platform.errors import UserError

pytestmark = pytest.mark.unit

SPLITS = {"train": 45, "test": 15, "all": 60}


@pytest.fixture(scope="module")
def npz(tmp_path_factory, fmnist_sample):
    """60 real Fashion-MNIST images with their labels, as an array source."""
    path = tmp_path_factory.mktemp("src") / "d.npz"
    np.savez(path, images=fmnist_sample["pixels"], labels=fmnist_sample["labels"])
    return path


@pytest.fixture(scope="module")
def local(npz):
    """The 60 images in 4 local shards with a fixed 45 / 15 split."""
    out = npz.parent / "shards"
    summary = build_shards(str(npz), str(out), rows_per_shard=16, test_fraction=0.25)
    assert (summary["shards"], summary["split"]["rows"]) == (4, {"train": 45, "test": 15})
    return out


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """s3://bucket/... served from tmp_path/store; any other URI goes to pyarrow as usual. Builds
    stage under tmp_path/tmp instead of the system temporary directory."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    store = tmp_path / "store"
    (store / "bucket").mkdir(parents=True)
    filesystem = pafs.SubTreeFileSystem(str(store), pafs.LocalFileSystem())
    real = sources._from_uri

    def from_uri(uri):
        return (filesystem, uri[len("s3://"):]) if uri.startswith("s3://") else real(uri)

    monkeypatch.setattr(sources, "_from_uri", from_uri)
    return store


def same_plan_output(a, b, cfg):
    """Every unit of two plans gives the same training views and the same evaluation crops."""
    def names(plan):
        return [(u.path.rsplit("/", 1)[-1], u.row_groups) for u in plan.units]

    assert names(a) == names(b) and a.rows == b.rows
    per_epoch = windows_per_epoch(a, cfg)
    for index in range(per_epoch, 2 * per_epoch):  # epoch 1
        for (xa, bad_a, na), (xb, bad_b, nb) in zip(item_blocks(a, cfg, seed=3, index=index),
                                                    item_blocks(b, cfg, seed=3, index=index), strict=True):
            assert (bad_a, na) == (bad_b, nb)
            for key in xa:
                np.testing.assert_array_equal(xa[key], xb[key])
    for ua, ub in zip(a.units, b.units):
        for (xa, _, _), (xb, _, _) in zip(eval_blocks(ua, a, 24, cfg.max_image_pixels),
                                          eval_blocks(ub, b, 24, cfg.max_image_pixels), strict=True):
            np.testing.assert_array_equal(xa["image"], xb["image"])
            np.testing.assert_array_equal(xa["label"], xb["label"])


CFG = DataConfig(global_views=2, global_size=24, local_views=1, local_size=12)


def test_file_uri_reads_exactly_what_the_local_path_reads(local, fmnist_sample):
    uri = local.as_uri()
    assert uri.startswith("file:///")
    records = list(ShardSource(uri).records())
    assert records == list(ShardSource(local).records())
    assert [r.id for r in records] == [f"d.npz/{i:06d}" for i in range(60)]
    assert [r.label for r in records] == fmnist_sample["labels"].tolist()
    assert read_manifest(uri) == read_manifest(local) and read_manifest(uri)["split"]["rows"] == {"train": 45, "test": 15}
    for split, rows in SPLITS.items():
        remote, here = plan_source(uri, split), plan_source(str(local), split)
        assert remote.rows == here.rows == rows
        assert remote.class_names == here.class_names and len(remote.class_names) == 10
        same_plan_output(remote, here, CFG)


def test_eval_set_through_a_uri_is_identical(local):
    for split in ("train", "test"):
        remote, here = load_eval_set(local.as_uri(), split, 20), load_eval_set(str(local), split, 20)
        assert remote.images.shape == (SPLITS[split], 3, 20, 20)
        np.testing.assert_array_equal(remote.images, here.images)
        np.testing.assert_array_equal(remote.labels, here.labels)
        assert remote.class_names == here.class_names and remote.skipped == here.skipped == 0


def test_bucket_paths_live_inside_the_filesystem_and_the_plan_carries_it(local, bucket, monkeypatch):
    shutil.copytree(local, bucket / "bucket" / "in1k")
    source = ShardSource("s3://bucket/in1k")
    assert source.files == [f"bucket/in1k/part-{i:05d}.parquet" for i in range(4)]
    assert list(source.records()) == list(ShardSource(local).records())
    assert source.fingerprint() == ShardSource(local).fingerprint()
    plan = plan_source("s3://bucket/in1k", "test")
    assert plan.units[0].path == "bucket/in1k/part-00000.parquet"
    # Ray tasks get the plan pickled and never resolve the URI themselves
    monkeypatch.setattr(sources, "_from_uri", lambda uri: pytest.fail(f"resolved {uri} again"))
    same_plan_output(pickle.loads(pickle.dumps(plan)), plan_source(str(local), "test"), CFG)


def test_inspect_through_a_uri(local, bucket):
    here = inspect_shards(str(local))
    for uri in (local.as_uri(), "s3://bucket/copy"):
        if uri.startswith("s3"):
            shutil.copytree(local, bucket / "bucket" / "copy")
        report = inspect_shards(uri)
        assert report["path"] == uri
        assert {k: v for k, v in report.items() if k != "path"} == {k: v for k, v in here.items() if k != "path"}
        assert report["rows"] == 60 and report["split"] == {"train": 45, "test": 15}
        assert report["content_hash_matches_manifest"] is True and report["unreadable"]["total"] == 0


def test_missing_or_unusable_uris_are_one_clear_error(tmp_path, bucket):
    missing = (tmp_path / "nowhere").as_uri()
    for call in (lambda: inspect_shards(missing), lambda: plan_source(missing, "all"),
                 lambda: read_manifest(missing), lambda: load_eval_set(missing, "test", 8)):
        with pytest.raises(UserError, match=f"source '{missing}' does not exist"):
            call()
    with pytest.raises(UserError, match="source 's3://bucket/in1k' does not exist"):
        plan_source("s3://bucket/in1k", "all")
    (bucket / "bucket" / "photos").mkdir()
    (bucket / "bucket" / "photos" / "a.png").write_bytes(b"x")
    with pytest.raises(UserError, match="no .parquet files in 's3://bucket/photos'; only Parquet shards"):
        plan_source("s3://bucket/photos", "all")
    with pytest.raises(UserError, match="'s3://bucket/photos' is not a shard directory"):
        inspect_shards("s3://bucket/photos")
    with pytest.raises(UserError, match="cannot open 'nosuchscheme://x/y'"):
        plan_source("nosuchscheme://x/y", "all")


def test_build_to_a_uri_uploads_shards_then_the_manifest(npz, local, bucket, monkeypatch):
    sent = []
    put = shards._put
    monkeypatch.setattr(shards, "_put", lambda src, fs, path: (sent.append(path), put(src, fs, path)))
    summary = build_shards(str(npz), "s3://bucket/out", rows_per_shard=16, test_fraction=0.25)
    assert (summary["out"], summary["status"]) == ("s3://bucket/out", "built")
    assert (summary["rows"], summary["shards"], summary["split"]["rows"]) == (60, 4, {"train": 45, "test": 15})
    assert sent == [f"bucket/out/part-{i:05d}.parquet" for i in range(4)] + ["bucket/out/manifest.json"]
    assert sorted(p.name for p in (bucket / "bucket" / "out").iterdir()) == sorted(p.name for p in local.iterdir())
    built = read_manifest("s3://bucket/out")
    expected = read_manifest(local)
    assert built["name"] == "out" and expected["name"] == "shards"
    assert {k: v for k, v in built.items() if k != "name"} == {k: v for k, v in expected.items() if k != "name"}
    assert list(ShardSource("s3://bucket/out").records()) == list(ShardSource(local).records())
    assert list((bucket.parent / "tmp" / "lejepa-shards").iterdir()) == []  # staging removed
    sent.clear()
    again = build_shards(str(npz), "s3://bucket/out", rows_per_shard=16, test_fraction=0.25)
    assert again["status"] == "unchanged" and sent == []
    with pytest.raises(UserError, match="'s3://bucket/out' already holds shards of a different build"):
        build_shards(str(npz), "s3://bucket/out", rows_per_shard=8)


def test_an_interrupted_upload_leaves_no_manifest_and_a_rerun_completes_it(npz, local, bucket, monkeypatch):
    put = shards._put
    uploaded = []

    def flaky(src, fs, path):
        if len(uploaded) == 2:
            raise OSError("connection reset")
        uploaded.append(path)
        put(src, fs, path)

    monkeypatch.setattr(shards, "_put", flaky)
    with pytest.raises(UserError, match=r"cannot write to 's3://bucket/run'.*connection reset.*re-run"):
        build_shards(str(npz), "s3://bucket/run", rows_per_shard=16, test_fraction=0.25)
    out = bucket / "bucket" / "run"
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    with pytest.raises(UserError, match="has no manifest.json"):
        read_manifest("s3://bucket/run")
    staged = shards._Upload("s3://bucket/run", quiet=True).staging
    assert staged.parent.parent == bucket.parent / "tmp" / "lejepa-shards"
    assert (staged / "manifest.json").is_file()  # the local build is kept for the re-run
    (out / "part-00099.parquet").write_bytes(b"left over")  # a stray shard of some earlier attempt
    monkeypatch.setattr(shards, "_put", put)
    summary = build_shards(str(npz), "s3://bucket/run", rows_per_shard=16, test_fraction=0.25)
    assert summary["status"] == "resumed" and summary["shards"] == 4
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in local.iterdir())
    assert list(ShardSource("s3://bucket/run").records()) == list(ShardSource(local).records())
    assert not staged.exists()


def test_a_uri_holding_other_files_is_refused(npz, bucket):
    (bucket / "bucket" / "busy").mkdir()
    (bucket / "bucket" / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="'s3://bucket/busy' exists and is not empty"):
        build_shards(str(npz), "s3://bucket/busy")
    assert [p.name for p in (bucket / "bucket" / "busy").iterdir()] == ["notes.txt"]
