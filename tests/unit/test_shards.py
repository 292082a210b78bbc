"""Parquet shards: lossless round trips from every source kind, stable ids and hashes, the exact
fixed split, atomic and resumable builds, inspection, the embedded dataset, and bad input."""

import gzip
import io
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lejepa_platform.data.shards import build as shards
from lejepa_platform.data.shards import build_shards, inspect_shards, read_manifest, resolve_source, split_mask
from lejepa_platform.data.sources import ShardSource
from lejepa_platform.errors import UserError

pytestmark = pytest.mark.unit

FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def rows(out):
    return list(ShardSource(out).records())


def pixels(data):
    return np.asarray(Image.open(io.BytesIO(data)))


def test_folder_round_trip_is_lossless_with_labels_from_subfolders(class_folder, tmp_path):
    out = tmp_path / "out"
    summary = build_shards(str(class_folder), str(out), rows_per_shard=5, image_format="png")
    assert (summary["status"], summary["rows"], summary["shards"]) == ("built", 12, 3)
    assert summary["classes"] == ["boots", "coats", "shirts"] and summary["class_counts"] == [4, 4, 4]
    assert summary["unlabelled"] == 0 and summary["skipped"] == {"undecodable": 0, "truncated": 0, "too_large": 0}
    manifest = read_manifest(out)
    assert [s["rows"] for s in manifest["shards"]] == [5, 5, 2] and manifest["rows"] == 12
    assert manifest["source"] == {"kind": "folder", "name": "folder"} and manifest["split"] is None
    records = rows(out)
    expected_ids = sorted(p.relative_to(class_folder).as_posix() for p in class_folder.rglob("img*"))
    assert [r.id for r in records] == expected_ids
    for record in records:
        assert record.label == ["boots", "coats", "shirts"].index(record.id.split("/")[0])
        np.testing.assert_array_equal(pixels(record.payload), pixels((class_folder / record.id).read_bytes()))
    assert not out.with_name("out.partial").exists()


def test_keep_stores_the_files_byte_for_byte(class_folder, tmp_path):
    build_shards(str(class_folder), str(tmp_path / "out"), image_format="keep")
    for record in rows(tmp_path / "out"):
        assert record.payload == (class_folder / record.id).read_bytes()


def write_idx(path, array, gz):
    codes = {1: 0x08}
    header = bytes([0, 0, codes[array.itemsize], array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, fmnist_sample, gz):
    suffix = ".gz" if gz else ""
    images = tmp_path / f"t10k-images-idx3-ubyte{suffix}"
    write_idx(images, fmnist_sample["pixels"][:20], gz)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", fmnist_sample["labels"][:20].astype(np.uint8), gz)
    (tmp_path / "classes.txt").write_text("\n".join(FASHION) + "\n")
    summary = build_shards(str(images), str(tmp_path / "out"), image_format="png")
    assert summary["classes"] == FASHION and summary["rows"] == 20
    records = rows(tmp_path / "out")
    assert [r.id for r in records] == [f"t10k-images-idx3-ubyte/{i:06d}" for i in range(20)]
    assert [r.label for r in records] == fmnist_sample["labels"][:20].tolist()
    for i, record in enumerate(records):
        np.testing.assert_array_equal(pixels(record.payload), fmnist_sample["pixels"][i])


def test_npy_and_npz_round_trip(tmp_path, fmnist_sample):
    grey = fmnist_sample["pixels"][:8]
    np.save(tmp_path / "grey.npy", grey)
    summary = build_shards(str(tmp_path / "grey.npy"), str(tmp_path / "a"))
    assert summary["unlabelled"] == 8 and summary["classes"] == []
    for i, record in enumerate(rows(tmp_path / "a")):
        assert record.label == -1 and record.id == f"grey.npy/{i:06d}"
        np.testing.assert_array_equal(pixels(record.payload), grey[i])
    chw = np.stack([grey, 255 - grey, grey // 2], axis=1)  # (N, 3, H, W): channels first
    np.savez(tmp_path / "rgb.npz", x=chw, y=np.arange(8) % 3)
    build_shards(str(tmp_path / "rgb.npz"), str(tmp_path / "b"))
    for i, record in enumerate(rows(tmp_path / "b")):
        assert record.label == i % 3
        np.testing.assert_array_equal(pixels(record.payload), chw[i].transpose(1, 2, 0))


def test_webdataset_tars_round_trip(tmp_path, fmnist_sample, image_tools):
    folder = tmp_path / "wds"
    folder.mkdir()
    pngs, labels = fmnist_sample["png"], fmnist_sample["labels"]
    for shard in range(2):
        samples = []
        for i in range(shard * 5, shard * 5 + 5):
            samples += [(f"s{i:03d}.png", pngs[i]), (f"s{i:03d}.cls", f"{labels[i]}\n".encode()),
                        (f"s{i:03d}.json", b"{}")]
        image_tools.write_tar(folder / f"shard-{shard}.tar", samples)
    summary = build_shards(str(folder), str(tmp_path / "out"))
    assert summary["rows"] == 10 and summary["source"]["kind"] == "webdataset"
    records = rows(tmp_path / "out")
    assert [r.id for r in records] == [f"shard-{i // 5}/s{i:03d}" for i in range(10)]
    assert [r.label for r in records] == labels[:10].tolist()
    assert [r.payload for r in records] == pngs[:10]


def test_rebuild_gives_the_same_ids_and_hash_and_rerun_is_a_no_op(class_folder, tmp_path):
    first = build_shards(str(class_folder), str(tmp_path / "a"), image_format="png", rows_per_shard=4)
    second = build_shards(str(class_folder), str(tmp_path / "b"), image_format="png", rows_per_shard=4)
    assert first["content_hash"] == second["content_hash"]
    assert [r.id for r in rows(tmp_path / "a")] == [r.id for r in rows(tmp_path / "b")]
    again = build_shards(str(class_folder), str(tmp_path / "a"), image_format="png", rows_per_shard=4)
    assert again["status"] == "unchanged" and again["content_hash"] == first["content_hash"]
    with pytest.raises(UserError, match="different build"):
        build_shards(str(class_folder), str(tmp_path / "a"), image_format="jpeg")


def test_interrupted_build_leaves_nothing_complete_and_resumes(class_folder, tmp_path, monkeypatch):
    clean = build_shards(str(class_folder), str(tmp_path / "clean"), image_format="png", rows_per_shard=3)
    real, calls = shards.convert_record, []

    def dies_on_the_eighth(record, opts):
        calls.append(record.id)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real(record, opts)

    monkeypatch.setattr(shards, "convert_record", dies_on_the_eighth)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        build_shards(str(class_folder), str(out), image_format="png", rows_per_shard=3)
    partial = tmp_path / "out.partial"
    assert not out.exists()
    assert sorted(p.name for p in partial.glob("part-*")) == ["part-00000.parquet", "part-00001.parquet"]
    assert not (partial / "manifest.json").exists()
    monkeypatch.setattr(shards, "convert_record", real)
    done = build_shards(str(class_folder), str(out), image_format="png", rows_per_shard=3)
    assert (done["status"], done["resumed_shards"], done["rows"]) == ("resumed", 2, 12)
    assert done["content_hash"] == clean["content_hash"] and not partial.exists()


def test_split_is_exact_per_class_and_seeded(tmp_path, fmnist_sample):
    labels = fmnist_sample["labels"]
    np.savez(tmp_path / "d.npz", images=fmnist_sample["pixels"], labels=labels)
    summary = build_shards(str(tmp_path / "d.npz"), str(tmp_path / "out"), test_fraction=0.25, split_seed=7)
    records = rows(tmp_path / "out")
    ids, labs = [r.id for r in records], np.array([r.label for r in records])
    test = split_mask(ids, labs, summary["split"], "test")
    expected = {c: int(round(0.25 * (labels == c).sum())) for c in np.unique(labels)}
    assert {c: int(test[labs == c].sum()) for c in expected} == expected
    assert summary["split"]["rows"] == {"train": 60 - sum(expected.values()), "test": sum(expected.values())}
    assert summary["split"]["method"] == "stratified"
    np.testing.assert_array_equal(split_mask(ids, labs, summary["split"], "train"), ~test)
    other = build_shards(str(tmp_path / "d.npz"), str(tmp_path / "other"), test_fraction=0.25, split_seed=8)
    assert not np.array_equal(split_mask(ids, labs, other["split"], "test"), test)


def test_builtin_dataset_is_the_fashion_mnist_test_split():
    path = resolve_source("builtin:fashion-mnist-10k")
    manifest = read_manifest(path)
    assert manifest["rows"] == 10_000 and manifest["classes"] == FASHION
    assert manifest["class_counts"] == [1000] * 10 and manifest["unlabelled"] == 0
    assert manifest["split"]["rows"] == {"train": 8000, "test": 2000}
    table = pq.read_table(path / "part-00000.parquet", columns=["id", "label"])
    labels = table.column("label").to_numpy()
    test = split_mask(table.column("id").to_pylist(), labels, manifest["split"], "test")
    assert np.bincount(labels[test], minlength=10).tolist() == [200] * 10
    report = inspect_shards("builtin:fashion-mnist-10k")
    assert report["unreadable"]["total"] == 0 and report["content_hash_matches_manifest"]
    assert sum(p.stat().st_size for p in path.iterdir()) < 6 * 2**20
    assert "Zalando SE" in (path / "LICENSE").read_text()
    with pytest.raises(UserError, match="builtin:fashion-mnist-10k"):
        resolve_source("builtin:imagenet")


def test_inspect_counts_unreadable_records(tmp_path, fmnist_sample, image_tools):
    pngs = list(fmnist_sample["png"][:10])
    pngs[2] = pngs[2][:150]
    pngs[5] = b"garbage"
    pngs[7] = image_tools.bomb(30000, 30000)
    ids = [f"r{i}" for i in range(10)]
    table = pa.table({"image": pa.array(pngs, pa.binary()), "label": pa.array(list(range(5)) * 2, pa.int64()),
                      "id": pa.array(ids, pa.string())})
    (tmp_path / "raw").mkdir()
    pq.write_table(table, tmp_path / "raw" / "data.parquet")
    report = inspect_shards(str(tmp_path / "raw"))
    assert report["rows"] == 10 and report["manifest"] is False
    assert [c["count"] for c in report["classes"]] == [2] * 5
    assert report["unreadable"] == {"total": 3, "undecodable": 1, "truncated": 1, "too_large": 1,
                                    "examples": ["r2", "r5", "r7"]}


def bad_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("x")
    (tmp_path / "texts" / "b.csv").write_text("1,2")
    (tmp_path / "junk").mkdir()
    for i in range(3):
        (tmp_path / "junk" / f"{i}.png").write_bytes(b"not a png at all")
    (tmp_path / "wrongcols").mkdir()
    pq.write_table(pa.table({"img": [b"x"], "y": [1]}), tmp_path / "wrongcols" / "a.parquet")
    return {"missing": "does not exist", "empty": "no image files", "texts": "no image files",
            "junk": "no readable images", "wrongcols": "lacks the expected column"}


def test_bad_input_is_one_clear_error_and_leaves_nothing(tmp_path):
    for name, message in bad_sources(tmp_path).items():
        out = tmp_path / f"out-{name}"
        with pytest.raises(UserError, match=message):
            build_shards(str(tmp_path / name), str(out))
        assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_unwritable_output_and_bad_options(class_folder, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot write"):
        build_shards(str(class_folder), str(tmp_path / "file" / "out"))
    for kwargs, message in (({"rows_per_shard": 0}, "rows per shard"), ({"image_format": "gif"}, "image format"),
                            ({"max_side": -1}, "max side"), ({"test_fraction": 1.0}, "test fraction")):
        with pytest.raises(UserError, match=message):
            build_shards(str(class_folder), str(tmp_path / "o"), **kwargs)
    assert not (tmp_path / "o").exists()


def test_max_side_downscales_and_keeps_the_format(class_folder, tmp_path):
    build_shards(str(class_folder), str(tmp_path / "out"), max_side=20)
    for record in rows(tmp_path / "out"):
        image = Image.open(io.BytesIO(record.payload))
        assert max(image.size) <= 20
        assert image.format == ("JPEG" if record.id.endswith(".jpg") else "PNG")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "lejepa_platform.cli", *args], capture_output=True, text=True)


def test_cli_builds_inspects_and_fails_with_exit_code_2(class_folder, tmp_path):
    bad = cli("shards", "build", str(tmp_path / "missing"), str(tmp_path / "o"))
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("lejepa: error: source") and "does not exist" in bad.stderr
    good = cli("shards", "build", str(class_folder), str(tmp_path / "out"), "--format", "png", "--json")
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["rows"] == 12
    seen = cli("shards", "inspect", str(tmp_path / "out"), "--json")
    report = json.loads(seen.stdout)
    assert report["rows"] == 12 and report["unreadable"]["total"] == 0 and report["content_hash_matches_manifest"]
