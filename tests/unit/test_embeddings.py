"""The embeddings directory and the embedding job's reads, without Ray: what `lejepa embed`'s tasks
run (raw_rows -> view_batch -> features -> embedding_table), what OUT may hold, what `lejepa eval`
reads back, and that a report on stored features equals the report on the images they came from."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_eval_protocols import TINY_VIT, _image_split
from test_sources_formats import write_hub_parquet

from lejepa_platform.data.embeddings import (DATA_DIR, FORMAT, JOB_FILE, EmbeddingsDir, embedding_table, place,
                                             raw_rows, read_embeddings, view_batch)
from lejepa_platform.data.reader import eval_blocks, plan_source
from lejepa_platform.data.shards import build_shards, split_mask
from lejepa_platform.errors import UserError
from lejepa_platform.eval.features import extract_features, weights_digest
from lejepa_platform.eval.report import Facts, embeddings_report, evaluation_report, load_encoder
from lejepa_platform.model import build_encoder

pytestmark = pytest.mark.unit

JOB = {"format": FORMAT, "job": "a" * 64}
MAX_PIXELS = 10**7


def rows_of(source: str) -> list[dict[str, np.ndarray]]:
    """What the job's read tasks yield for every unit of `source`, as numpy batches."""
    plan = plan_source(source, "all")
    placement = place(plan)
    return [{k: np.array(v, dtype=object if k in ("id", "split", "image") else None)
             for k, v in table.to_pydict().items()}
            for unit in plan.units for table in raw_rows(unit, plan, placement=placement)]


def test_rows_carry_their_place_in_the_source_and_their_side_of_its_split(class_folder, tmp_path):
    shards = tmp_path / "shards"
    build_shards(str(class_folder), str(shards), rows_per_shard=5, test_fraction=0.25)
    batches = rows_of(str(shards))
    ids = [i for b in batches for i in b["id"]]
    labels = np.concatenate([b["label"] for b in batches])
    assert np.concatenate([b["position"] for b in batches]).tolist() == list(range(12))
    plan = plan_source(str(shards), "all")
    test = split_mask(ids, labels, plan.split_spec, "test")
    assert [s for b in batches for s in b["split"]] == ["test" if t else "train" for t in test]
    assert test.sum() == 3
    views = [view_batch(b, size=16, max_pixels=MAX_PIXELS) for b in batches]
    expected = [block["image"] for unit in plan.units for block, _, _ in eval_blocks(unit, plan, 16, MAX_PIXELS)]
    np.testing.assert_array_equal(np.concatenate([v["view"] for v in views]), np.concatenate(expected))
    assert rows_of(str(class_folder))[0]["split"].tolist() == [None] * 12  # a folder has no split of its own


def test_hub_train_and_test_files_are_the_split(class_folder, tmp_path):
    hub = tmp_path / "hub"
    write_hub_parquet(hub / "train-00000-of-00001.parquet", class_folder)
    write_hub_parquet(hub / "test-00000-of-00001.parquet", class_folder)
    batches = rows_of(str(hub))
    sides = {i.split("/")[0]: s for b in batches for i, s in zip(b["id"], b["split"])}
    assert sides == {"train-00000-of-00001": "train", "test-00000-of-00001": "test"}
    assert np.concatenate([b["position"] for b in batches]).tolist() == list(range(24))


def write_embeddings(folder, parts):
    """A finished embeddings directory holding these (rows, features) parts, one file each."""
    (folder / DATA_DIR).mkdir(parents=True)
    for index, (batch, features) in enumerate(parts):
        pq.write_table(embedding_table(batch, features), folder / DATA_DIR / f"{index}.parquet")
    files = sorted(f"{DATA_DIR}/{p.name}" for p in (folder / DATA_DIR).iterdir())
    count = sum(len(features) for _, features in parts)
    manifest = {**JOB, "files": files, "dimension": parts[0][1].shape[1], "count": count}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_directory_reads_back_in_stored_order_with_float32_fixed_size_vectors(class_folder, tmp_path):
    (rows,) = rows_of(str(class_folder))
    features = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32)
    backwards = {k: v[::-1] for k, v in rows.items()}
    parts = [({k: v[:7] for k, v in backwards.items()}, features[::-1][:7]),
             ({k: v[7:] for k, v in backwards.items()}, features[::-1][7:])]
    out = tmp_path / "emb"
    write_embeddings(out, parts)
    kind = pq.read_table(out / DATA_DIR).schema.field("embedding").type
    assert (kind.list_size, str(kind.value_type)) == (5, "float")
    read = read_embeddings(str(out))
    np.testing.assert_array_equal(read.features, features)
    assert read.ids == rows["id"].tolist() and read.labels.tolist() == rows["label"].tolist()
    assert read.split == [None] * 12


def test_what_an_output_directory_may_hold(tmp_path):
    assert EmbeddingsDir(str(tmp_path / "new")).state(JOB) == "new"
    (tmp_path / "empty").mkdir()
    assert EmbeddingsDir(str(tmp_path / "empty")).state(JOB) == "new"
    started = EmbeddingsDir(str(tmp_path / "started"))
    started.start(JOB)
    assert started.state(JOB) == "resume" and (tmp_path / "started" / JOB_FILE).is_file()
    with pytest.raises(UserError, match="holds embeddings of another run, data or features"):
        started.state({**JOB, "job": "b" * 64})
    with pytest.raises(UserError, match="not a finished embeddings directory"):
        started.manifest()
    started.finish({**JOB, "files": []})
    assert started.state(JOB) == "done" and sorted(p.name for p in (tmp_path / "started").iterdir()) == [
        "manifest.json"]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("x")
    for name, message in (("busy", "exists and is not an embeddings directory"), ("file", "is not a directory")):
        with pytest.raises(UserError, match=message):
            EmbeddingsDir(str(tmp_path / name)).state(JOB)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_report_on_stored_features_equals_the_report_on_the_images():
    """The pretrained backbone's probes and geometry from features extracted once equal
    evaluation_report's on the images; the baselines are null."""
    train, test = _image_split(60, 1), _image_split(30, 2)
    torch.manual_seed(3)
    state = build_encoder(TINY_VIT).state_dict()
    on_images = evaluation_report(TINY_VIT, state, train, test, protocols=("knn", "linear", "fewshot"), seed=4)
    encoder = load_encoder(TINY_VIT, state, seed=4)
    feats = {name: extract_features(encoder, split.images, features="embedding+patch_mean")
             for name, split in (("train", train), ("test", test))}
    facts = Facts(TINY_VIT.backbone, 24, "embedding+patch_mean", 48, [16, 16], "embeddings")
    stored = embeddings_report(facts, (feats["train"], train.labels), (feats["test"], test.labels),
                               protocols=("knn", "linear", "fewshot"), seed=4)
    assert stored["models"]["pretrained"] == pytest.approx(on_images["models"]["pretrained"], abs=1e-6)
    assert stored["geometry"]["pretrained"]["effective_rank"] == pytest.approx(
        on_images["geometry"]["pretrained"]["effective_rank"], rel=1e-5)
    assert stored["models"]["random_init"] is None and stored["geometry"]["random_init"] is None
    assert {k: stored[k] for k in ("num_train", "num_test", "num_classes", "num_held_out", "feature_dim")} == {
        k: on_images[k] for k in ("num_train", "num_test", "num_classes", "num_held_out", "feature_dim")}
    assert set(stored) == set(on_images) and stored["features_from"] == "embeddings"
    with pytest.raises(UserError, match="the test data has no labels"):
        embeddings_report(facts, (feats["train"], train.labels), (feats["test"], np.full(30, -1)),
                          protocols=("knn",), seed=4)


def test_the_weights_digest_names_the_backbone_however_it_was_stored():
    torch.manual_seed(0)
    encoder = build_encoder(TINY_VIT)
    from_full = load_encoder(TINY_VIT, encoder.state_dict())
    from_backbone = load_encoder(TINY_VIT, encoder.backbone.state_dict())
    assert weights_digest(from_full.backbone) == weights_digest(from_backbone.backbone)
    assert weights_digest(build_encoder(TINY_VIT).backbone) != weights_digest(from_full.backbone)
