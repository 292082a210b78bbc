"""The cluster-scale data jobs on a real local Ray cluster: `lejepa shards build` on Ray Data against
the single-process build, `lejepa embed` on a pretrained run (one row per image, killed and re-run:
each id once), and `lejepa eval` on its embeddings against `lejepa eval` on the images.

Real images throughout: a labelled folder of the embedded Fashion-MNIST PNGs with some files
truncated and some not images at all.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lejepa_platform.cli import main
from lejepa_platform.data.embeddings import CHECKPOINT_DIR, read_embeddings
from lejepa_platform.data.shards import build_shards, read_manifest, split_mask
from lejepa_platform.data.sources import ShardSource
from lejepa_platform.errors import UserError
from lejepa_platform.run.embed import embed
from lejepa_platform.run.evaluate import eval_from_cli

pytestmark = pytest.mark.e2e

IMAGES = 240
UNREADABLE = [i for i in range(IMAGES) if i % 40 == 7 or i % 60 == 11]
"""Files of the source folder that are not readable images: a third of a PNG, or text."""
COMPARED = ("rows", "classes", "class_counts", "unlabelled", "skipped", "split")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A class-per-folder source of IMAGES real PNGs, the UNREADABLE ones cut short or not images."""
    from lejepa_platform.data.sources import resolve_source

    root = tmp_path_factory.mktemp("jobs") / "folder"
    table = pq.read_table(resolve_source("builtin:fashion-mnist-10k") / "part-00000.parquet").slice(0, IMAGES)
    for i, (png, label) in enumerate(zip(table.column("image").to_pylist(), table.column("label").to_pylist())):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        data = png[: len(png) // 3] if i % 40 == 7 else b"no image here" if i % 60 == 11 else png
        (folder / f"{i:04d}.png").write_bytes(data)
    return root


def rows_by_id(shards: str) -> dict[str, tuple[int, bytes]]:
    return {r.id: (r.label, r.payload) for r in ShardSource(shards).records()}


def build_both(source: Path, out: Path, **kwargs) -> tuple[dict, dict]:
    single = build_shards(str(source), str(out / "single"), quiet=True, **kwargs)
    on_ray = build_shards(str(source), str(out / "ray"), quiet=True, address="local", **kwargs)
    return single, on_ray


def test_shards_built_on_ray_data_equal_the_single_process_build(ray_cluster, source, tmp_path):
    single, on_ray = build_both(source, tmp_path, image_format="png", rows_per_shard=64, test_fraction=0.25)
    assert single["skipped"] == on_ray["skipped"] and sum(on_ray["skipped"].values()) == len(UNREADABLE)
    assert {k: single[k] for k in COMPARED} == {k: on_ray[k] for k in COMPARED}
    assert on_ray["rows"] == IMAGES - len(UNREADABLE)
    built = {name: rows_by_id(str(tmp_path / name)) for name in ("single", "ray")}
    assert built["single"] == built["ray"]  # same ids, labels and bytes
    ids = list(built["ray"])
    labels = np.array([built["ray"][i][0] for i in ids])
    for name in ("single", "ray"):
        spec = read_manifest(tmp_path / name)["split"]
        assert spec == on_ray["split"] and split_mask(ids, labels, spec, "test").sum() == spec["rows"]["test"]
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == ["manifest.json"] + [
        s["file"] for s in read_manifest(tmp_path / "ray")["shards"]]
    assert not (tmp_path / "ray.partial").exists()
    again = build_shards(str(source), str(tmp_path / "again"), quiet=True, address="local", image_format="png",
                         rows_per_shard=64, test_fraction=0.25)
    assert again["content_hash"] == on_ray["content_hash"]  # same shards: Ray Data keeps the source's order
    rerun = build_shards(str(source), str(tmp_path / "ray"), quiet=True, address="local", image_format="png",
                         rows_per_shard=64, test_fraction=0.25)
    assert rerun["status"] == "unchanged"


def test_shards_on_ray_data_into_a_bucket(cloud, source, tmp_path):
    """Ray Data's write tasks put the shards straight into the bucket, the manifest last."""
    local = build_shards(str(source), str(tmp_path / "local"), quiet=True, rows_per_shard=100, test_fraction=0.1)
    remote = build_shards(str(source), "s3://lejepa/jobs/shards", quiet=True, rows_per_shard=100, test_fraction=0.1,
                          address="local")
    assert {k: local[k] for k in COMPARED} == {k: remote[k] for k in COMPARED}
    assert rows_by_id("s3://lejepa/jobs/shards") == rows_by_id(str(tmp_path / "local"))
    keys = [o["Key"] for o in cloud.s3.list_objects_v2(Bucket="lejepa", Prefix="jobs/shards/")["Contents"]]
    assert sorted(keys) == sorted(["jobs/shards/manifest.json"] + [f"jobs/shards/{s['file']}" for s in
                                                                   read_manifest("s3://lejepa/jobs/shards")["shards"]])


def test_a_bad_label_on_ray_data_is_one_error_and_leaves_nothing(ray_cluster, source, tmp_path):
    names = ["only", "two"]  # the folder has labels 0..9
    with pytest.raises(UserError, match=r"has label \d; allowed: -1 \(unlabelled\) or 0..1 for the 2 class names"):
        build_shards(str(source), str(tmp_path / "out"), quiet=True, address="local", class_names=names)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def pretrained(ray_cluster, source, tmp_path_factory) -> dict:
    """A tiny pretraining (its run directory) and the source as shards with a fixed split."""
    from test_pretrain import tiny_config

    from lejepa_platform.run.launch import pretrain

    tmp = tmp_path_factory.mktemp("embed")
    shards = tmp / "shards"
    build_shards(str(source), str(shards), quiet=True, image_format="png", test_fraction=0.25)
    cfg = tiny_config(tmp, "train.name=embedme", "train.steps=6", "train.workers=1", "train.log_every=3",
                      "train.checkpoint_every=3", "data.local_views=0", f"data.source={shards}")
    pretrain(cfg, quiet=True)
    return {"run": str(tmp / "runs" / "embedme"), "shards": str(shards), "tmp": tmp, "embed_dim": 32}


def test_embed_writes_one_row_per_image_and_eval_on_it_equals_eval_on_the_images(pretrained, tmp_path,
                                                                                monkeypatch):
    out = tmp_path / "emb"
    summary = embed(pretrained["run"], data=pretrained["shards"], out=str(out), quiet=True, rows_per_file=64)
    rows = IMAGES - len(UNREADABLE)
    assert (summary["status"], summary["count"], summary["skipped"], summary["split"]) == ("built", rows, 0, "own")
    assert summary["dimension"] == 2 * pretrained["embed_dim"]  # a ViT read as embedding+patch_mean
    table = pq.read_table(out / "data")
    assert table.schema.field("embedding").type.list_size == summary["dimension"]
    assert str(table.schema.field("embedding").type.value_type) == "float"
    shard_rows = rows_by_id(pretrained["shards"])
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(shard_rows)
    assert table.column("label").to_pylist() == [shard_rows[i][0] for i in ids]
    spec = read_manifest(pretrained["shards"])["split"]
    test = split_mask(ids, table.column("label").to_numpy(), spec, "test")
    assert table.column("split").to_pylist() == ["test" if t else "train" for t in test]
    assert sorted(p.name for p in out.iterdir()) == ["data", "manifest.json"]  # checkpoint and job file gone
    assert embed(pretrained["run"], data=pretrained["shards"], out=str(out), quiet=True)["status"] == "unchanged"

    monkeypatch.chdir(tmp_path)
    on_images = eval_from_cli(pretrained["run"], data=pretrained["shards"], protocols="knn", tracking_uri=None)
    on_embeddings = eval_from_cli(pretrained["run"], data=str(out), protocols="knn", tracking_uri=None)
    assert on_embeddings["features_from"] == "embeddings" and on_images["features_from"] == "images"
    for key in ("num_train", "num_test", "num_classes", "num_held_out", "feature_dim", "embed_dim", "split"):
        assert on_embeddings[key] == on_images[key], key
    for key, value in on_images["models"]["pretrained"].items():
        assert on_embeddings["models"]["pretrained"][key] == pytest.approx(value, abs=1e-6), key
    assert on_embeddings["geometry"]["pretrained"]["effective_rank"] == pytest.approx(
        on_images["geometry"]["pretrained"]["effective_rank"], rel=1e-4)
    assert on_embeddings["models"]["random_init"] is None and on_embeddings["geometry"]["random_init"] is None


def test_embed_into_a_bucket_and_eval_reads_it_there(cloud, pretrained, tmp_path, monkeypatch):
    summary = embed(pretrained["run"], data=pretrained["shards"], out="s3://lejepa/jobs/emb", quiet=True,
                    features="embedding")
    assert (summary["count"], summary["dimension"]) == (IMAGES - len(UNREADABLE), pretrained["embed_dim"])
    keys = [o["Key"] for o in cloud.s3.list_objects_v2(Bucket="lejepa", Prefix="jobs/emb/")["Contents"]]
    assert "jobs/emb/manifest.json" in keys and not [k for k in keys if "/.checkpoint/" in k or ".job.json" in k]
    monkeypatch.chdir(tmp_path)
    report = eval_from_cli(pretrained["run"], data="s3://lejepa/jobs/emb", protocols="knn", tracking_uri=None)
    assert report["features_from"] == "embeddings" and report["num_test"] + report["num_train"] == summary["count"]


def committed_checkpoints(out: Path) -> list[str]:
    folder = out / CHECKPOINT_DIR
    return [p.name for p in folder.iterdir() if ".pending." not in p.name] if folder.is_dir() else []


def test_embed_killed_mid_way_and_run_again_writes_each_id_once(pretrained, tmp_path):
    """The driver is SIGKILLed once Ray Data has committed a first file; the re-run finishes the job."""
    from clusters import local_cluster

    out = tmp_path / "emb"
    cmd = [sys.executable, "-m", "lejepa_platform.cli", "embed", pretrained["run"], "--data", pretrained["shards"],
           "--out", str(out), "--rows-per-file", "16", "--batch-size", "16", "--actors", "1", "--json"]
    with local_cluster(num_cpus=3) as cluster:
        cmd += ["--address", cluster.address]
        first = subprocess.Popen(cmd, env=cluster.driver_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while not committed_checkpoints(out) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert first.returncode == -signal.SIGKILL, "the job ended before it could be killed"
        assert not (out / "manifest.json").exists()
        with pytest.raises(UserError, match="not a finished embeddings directory"):
            read_embeddings(str(out))
        written_before = len(list((out / "data").glob("*.parquet")))
        again = subprocess.run(cmd, env=cluster.driver_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout)
    assert summary["status"] == "resumed" and summary["count"] == IMAGES - len(UNREADABLE)
    ids = pq.read_table(out / "data", columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == summary["count"]
    assert set(ids) == set(rows_by_id(pretrained["shards"]))
    assert 0 < written_before < len(read_embeddings(str(out)).manifest["files"])


@pytest.fixture(scope="module")
def other_checkpoint(pretrained) -> str:
    """A checkpoint of the same model at other (random) weights."""
    import torch

    from lejepa_platform.model import build_encoder
    from lejepa_platform.run.evaluate import load_target
    from lejepa_platform.train.checkpoint import TrainState, save_checkpoint

    cfg, _, _ = load_target(pretrained["run"], "")
    model = {f"encoder.{k}": v for k, v in build_encoder(cfg.model).state_dict().items()}
    return str(save_checkpoint(pretrained["tmp"] / "other", TrainState(model, {}, 0, {"torch": torch.get_rng_state()}),
                               cfg))


@pytest.mark.parametrize("command, message", [
    (["embed", "/nonexistent/run", "--data", "SHARDS", "--out", "NEW"], "is not a checkpoint directory"),
    (["embed", "0123456789abcdef", "--data", "SHARDS", "--out", "NEW"], "no MLflow run with id"),
    (["embed", "RUN", "--data", "EMPTY", "--out", "NEW"], "no image files"),
    (["embed", "RUN", "--data", "SHARDS", "--out", "BUSY"], "exists and is not an embeddings directory"),
    (["embed", "RUN", "--data", "SHARDS", "--out", "NEW", "--actors", "-1"], "--actors -1 is not allowed"),
    (["eval", "OTHER", "--data", "EMBEDDINGS"], "holds embeddings of another backbone"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(pretrained, other_checkpoint, tmp_path, capfd, command,
                                                          message):
    embeddings = tmp_path / "embeddings"
    if "EMBEDDINGS" in command:
        embed(pretrained["run"], data=pretrained["shards"], out=str(embeddings), quiet=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    names = {"SHARDS": pretrained["shards"], "RUN": pretrained["run"], "OTHER": other_checkpoint,
             "EMPTY": str(tmp_path / "empty"), "NEW": str(tmp_path / "new"), "BUSY": str(tmp_path / "busy"),
             "EMBEDDINGS": str(embeddings)}
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    capfd.readouterr()
    with contextlib.chdir(tmp_path):
        code = main([names.get(a, a) for a in command] + ["--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"])
    err = capfd.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # no store made by looking a run up either
