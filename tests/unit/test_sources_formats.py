"""Formats users already have: Hugging Face Hub-layout Parquet and CSV / JSONL path lists give the
same shards (pixels, labels, class names) as the same images in class folders, read directly too;
a list naming a missing file fails in one line leaving nothing behind; WebDataset tar row counts
come from a stored index; probe sets without a manifest split get a seeded, exact one."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lejepa_platform.data import evalset
from lejepa_platform.data.evalset import load_eval_set, load_eval_splits, seeded_test_mask
from lejepa_platform.data.reader import plan_source
from lejepa_platform.data.shards import build_shards, read_manifest
from lejepa_platform.data.sources import HubParquetSource, PathListSource, ShardSource, open_source
from lejepa_platform.data.sources import tar as tar_module
from lejepa_platform.errors import UserError

pytestmark = pytest.mark.unit

CLASSES = ["boots", "coats", "shirts"]
HUB_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def folder_files(class_folder):
    """(relative path, label) of the fixture's images in the folder source's order."""
    rel = sorted(p.relative_to(class_folder).as_posix() for p in class_folder.rglob("img*"))
    return [(r, CLASSES.index(r.split("/")[0])) for r in rel]


def write_hub_parquet(path, class_folder, *, row_group_size=5, names=CLASSES):
    files = folder_files(class_folder)
    images = pa.array([{"bytes": (class_folder / r).read_bytes(), "path": r.split("/")[-1]} for r, _ in files],
                      HUB_IMAGE)
    table = pa.table({"image": images, "label": pa.array([lab for _, lab in files], pa.int64())})
    features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def decoded(out):
    """(labels, pixel arrays) of a shard build, in stored order."""
    records = list(ShardSource(out).records())
    return [r.label for r in records], [np.asarray(Image.open(io.BytesIO(r.payload))) for r in records]


def assert_same_shards(a, b):
    labels_a, pixels_a = decoded(a)
    labels_b, pixels_b = decoded(b)
    assert labels_a == labels_b
    assert len(pixels_a) == len(pixels_b) == 12
    for x, y in zip(pixels_a, pixels_b):
        np.testing.assert_array_equal(x, y)
    assert read_manifest(a)["classes"] == read_manifest(b)["classes"] == CLASSES
    assert read_manifest(a)["class_counts"] == read_manifest(b)["class_counts"] == [4, 4, 4]


def test_hub_parquet_gives_the_shards_the_class_folders_give(class_folder, tmp_path):
    hub = write_hub_parquet(tmp_path / "hub" / "train-00000-of-00001.parquet", class_folder)
    source = open_source(str(hub.parent))
    assert isinstance(source, HubParquetSource) and source.class_names() == CLASSES
    summary = build_shards(str(hub.parent), str(tmp_path / "from-hub"))
    assert summary["source"] == {"kind": "hub-parquet", "name": "hub"} and summary["rows"] == 12
    build_shards(str(class_folder), str(tmp_path / "from-folder"))
    assert_same_shards(tmp_path / "from-hub", tmp_path / "from-folder")
    ids = [r.id for r in ShardSource(tmp_path / "from-hub").records()]
    assert ids == [f"train-00000-of-00001/{i:06d}" for i in range(12)]


def test_hub_parquet_is_read_directly_with_counts_from_the_footers(class_folder, tmp_path):
    hub = write_hub_parquet(tmp_path / "hub.parquet", class_folder, row_group_size=5)
    plan = plan_source(str(hub), "all")
    assert (plan.rows, plan.class_names, plan.labelled) == (12, tuple(CLASSES), None)
    assert [u.kind for u in plan.units] == ["hub"] and plan.units[0].row_groups == (0, 1, 2)
    direct = load_eval_set(str(hub), "all", 16)
    build_shards(str(class_folder), str(tmp_path / "shards"), test_fraction=0.0)
    via_shards = load_eval_set(str(tmp_path / "shards"), "all", 16)
    np.testing.assert_array_equal(direct.images, via_shards.images)
    np.testing.assert_array_equal(direct.labels, via_shards.labels)
    # no label column, no class names: unlabelled, and known to be without reading an image
    table = pq.read_table(hub).drop_columns(["label"]).replace_schema_metadata(None)
    pq.write_table(table, tmp_path / "nolabels.parquet")
    plan = plan_source(str(tmp_path / "nolabels.parquet"), "all")
    assert (plan.rows, plan.labelled, plan.class_names) == (12, 0, ())
    assert (load_eval_set(str(tmp_path / "nolabels.parquet"), "all", 16).labels == -1).all()


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_path_list_gives_the_shards_the_class_folders_give(class_folder, tmp_path, kind):
    files = folder_files(class_folder)
    listing = class_folder.parent / f"list.{kind}"
    if kind == "csv":  # labels as class names, paths relative to the list's folder
        listing.write_text("path,label\n" + "".join(f"folder/{r},{r.split('/')[0]}\n" for r, _ in files))
    else:  # integer labels named by a classes.txt; one absolute path
        rows = [{"file_name": str(class_folder / r) if i == 0 else f"folder/{r}", "label": lab}
                for i, (r, lab) in enumerate(files)]
        listing.write_text("".join(json.dumps(row) + "\n" for row in rows))
        (class_folder.parent / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    source = open_source(str(listing))
    assert isinstance(source, PathListSource) and source.class_names() == CLASSES
    build_shards(str(listing), str(tmp_path / "from-list"))
    build_shards(str(class_folder), str(tmp_path / "from-folder"))
    assert_same_shards(tmp_path / "from-list", tmp_path / "from-folder")
    plan = plan_source(str(listing), "all")
    assert (plan.rows, plan.labelled) == (12, 12)
    np.testing.assert_array_equal(load_eval_set(str(listing), "all", 16).images,
                                  load_eval_set(str(class_folder), "all", 16).images)


def test_path_list_with_uris_and_unlabelled_rows(class_folder, tmp_path):
    files = folder_files(class_folder)
    listing = tmp_path / "uris.csv"
    listing.write_text("uri,label\n" + "".join(f"{(class_folder / r).as_uri()},{lab if i % 2 else ''}\n"
                                               for i, (r, lab) in enumerate(files)))
    labels = [lab for _, lab in PathListSource(listing).entries]
    assert labels == [lab if i % 2 else -1 for i, (_, lab) in enumerate(files)]
    assert build_shards(str(listing), str(tmp_path / "out"))["unlabelled"] == 6


def test_list_naming_a_missing_file_is_one_line_and_leaves_nothing(class_folder, tmp_path):
    listing = tmp_path / "bad.csv"
    listing.write_text("path,label\n" + f"{class_folder / 'boots' / 'img00.png'},boots\n" + "gone/nowhere.png,coats\n")
    out = tmp_path / "out"
    with pytest.raises(UserError) as err:
        build_shards(str(listing), str(out))
    message = str(err.value)
    assert "\n" not in message and "line 3" in message and "'gone/nowhere.png' does not exist" in message
    assert not out.exists() and not out.with_name("out.partial").exists()
    for text, expected in (("name,label\nx.png,1\n", "the image path must be in a column named one of path"),
                           ("path,label\n", "lists no images")):
        listing.write_text(text)
        with pytest.raises(UserError, match=expected):
            build_shards(str(listing), str(out))
    listing.with_suffix(".jsonl").write_text('{"path": "a.png"}\nnot json\n')
    with pytest.raises(UserError, match="line 2 is not JSON"):
        open_source(str(listing.with_suffix(".jsonl")))
    assert not out.exists() and not out.with_name("out.partial").exists()


def test_tar_rows_come_from_a_stored_index_not_from_reading_records(tmp_path, fmnist_sample, monkeypatch, image_tools):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "wds"
    folder.mkdir()
    pngs, labels = fmnist_sample["png"], fmnist_sample["labels"]
    for shard, count in ((0, 7), (1, 5)):
        samples = []
        for i in range(shard * 7, shard * 7 + count):
            samples += [(f"s{i:03d}.png", pngs[i]), (f"s{i:03d}.json", b"{}")]
            if i % 3:
                samples.append((f"s{i:03d}.cls", f"{labels[i]}".encode()))
        samples.append(("orphan.json", b"{}"))  # no image member: not a row
        image_tools.write_tar(folder / f"shard-{shard}.tar", samples)
    plan = plan_source(str(folder), "all")
    expected_labelled = sum(1 for i in [*range(7), *range(7, 12)] if i % 3)
    assert (plan.rows, plan.labelled, len(plan.units)) == (12, expected_labelled, 2)
    assert len(list((tmp_path / "cache" / "lejepa_platform" / "tar-index").glob("*.json"))) == 2
    assert sum(1 for _ in open_source(str(folder)).records()) == 12  # the index agrees with a full read

    def no_reading(*args, **kwargs):
        raise AssertionError("a tar was read again although its index is stored")

    monkeypatch.setattr(tar_module, "_samples", no_reading)
    assert plan_source(str(folder), "all").rows == 12
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    image_tools.write_tar(folder / "shard-1.tar", [("a.png", pngs[0]), ("b.png", pngs[1])])  # changed: indexed again
    assert plan_source(str(folder), "all").rows == 9


def test_seeded_split_without_a_manifest_is_exact_per_class_and_seeded(class_folder):
    labels = np.array([0] * 10 + [1] * 5 + [-1] * 20)
    test = seeded_test_mask(labels, 0.2, seed=4)
    assert [int(test[labels == v].sum()) for v in (0, 1, -1)] == [2, 1, 4]
    np.testing.assert_array_equal(test, seeded_test_mask(labels, 0.2, seed=4))
    assert not np.array_equal(test, seeded_test_mask(labels, 0.2, seed=5))
    splits = load_eval_splits(str(class_folder), 16, seed=0)
    assert splits.split == "seeded" and len(splits.train.labels) + len(splits.test.labels) == 12
    fraction = evalset.SEEDED_TEST_FRACTION
    assert np.bincount(splits.test.labels).tolist() == [int(round(fraction * 4))] * 3
    manifest = load_eval_splits("builtin:fashion-mnist-10k", 28, seed=0, need_train=False, max_rows=100)
    assert manifest.split == "own" and manifest.train is None and len(manifest.test.labels) == 100


def test_hub_train_and_test_files_are_the_sources_own_split(class_folder, tmp_path):
    hub = tmp_path / "hub"
    write_hub_parquet(hub / "train-00000-of-00001.parquet", class_folder)
    table = pq.read_table(hub / "train-00000-of-00001.parquet")
    pq.write_table(table.slice(0, 5), hub / "test-00000-of-00001.parquet")
    pq.write_table(table.slice(5, 2), hub / "validation-00000-of-00001.parquet")
    assert [plan_source(str(hub), split).rows for split in ("train", "test", "all")] == [12, 5, 19]
    splits = load_eval_splits(str(hub), 16, seed=0)
    assert splits.split == "own" and (len(splits.train.labels), len(splits.test.labels)) == (12, 5)
    np.testing.assert_array_equal(splits.test.labels, table.column("label").to_numpy()[:5])
    np.testing.assert_array_equal(splits.test.images, load_eval_set(str(hub / "test-00000-of-00001.parquet"),
                                                                    "all", 16).images)


def test_a_hub_dataset_repository_is_read_from_its_root(class_folder, tmp_path):
    repo = tmp_path / "repo"
    write_hub_parquet(repo / "data" / "train-00000-of-00001.parquet", class_folder)
    table = pq.read_table(repo / "data" / "train-00000-of-00001.parquet")
    pq.write_table(table.slice(0, 4), repo / "data" / "test-00000-of-00001.parquet")
    (repo / "README.md").write_text("---\nconfigs: [default]\n---\n")
    (repo / ".gitattributes").write_text("*.parquet filter=lfs\n")
    root, data = (plan_source(str(where), split) for where, split in ((repo, "train"), (repo / "data", "train")))
    assert open_source(str(repo)).kind == "hub-parquet" and root.rows == data.rows == 12
    assert [plan_source(str(repo), split).rows for split in ("test", "all")] == [4, 16]  # split from the file names
    assert load_eval_set(str(repo), "test", 16).labels.tolist() == load_eval_set(str(repo / "data"), "test", 16).labels.tolist()
    write_hub_parquet(repo / "other" / "train-00000-of-00001.parquet", class_folder)  # a second config
    with pytest.raises(UserError, match=r"holds Parquet files in several folders \(data, other\): give the one"):
        open_source(str(repo))
