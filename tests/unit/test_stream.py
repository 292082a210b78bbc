"""The training order of data/stream.py on the embedded dataset: a pure function of (seed, epoch),
every training image once per epoch, ranks partitioning the items, and a resumed item yielding
exactly the rows after its position without decoding the ones before."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest

from lejepa_platform.data import stream
from lejepa_platform.data.reader import plan_source
from lejepa_platform.data.stream import StreamPosition, item_blocks, rank_items, work_item, windows_per_epoch
from lejepa_platform.defaults import default_run_config

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def setup():
    cfg = default_run_config().data
    return plan_source(cfg.source, cfg.split), cfg


def rows_of(blocks) -> dict[str, np.ndarray]:
    got = [b for b, _, _ in blocks if b is not None]
    return {key: np.concatenate([b[key] for b in got]) for key in got[0]}


def test_an_epoch_is_every_unit_once_in_windows_fixed_by_seed_and_epoch(setup):
    plan, cfg = setup
    per_epoch = windows_per_epoch(plan, cfg)
    assert per_epoch == 10  # 20 units of 512 rows, windows of 1024 rows (the default's shuffle_buffer)
    for epoch in (0, 1):
        units = [u for w in range(per_epoch) for u in work_item(plan, cfg, 0, epoch * per_epoch + w).units]
        assert sorted(units, key=plan.units.index) == list(plan.units)
    first, again = work_item(plan, cfg, 0, 3), work_item(plan, cfg, 0, 3)
    assert first == again and first.epoch == 0 and first.window == 3
    assert work_item(plan, cfg, 0, 13).units != first.units  # epoch 1 has its own order
    assert work_item(plan, cfg, 1, 3).units != first.units  # so does another seed
    assert np.array_equal(first.row_order(1024, 0), again.row_order(1024, 0))
    assert not np.array_equal(first.row_order(1024, 0), work_item(plan, cfg, 0, 13).row_order(1024, 0))


def test_ranks_partition_the_items_and_resume_from_their_own(setup):
    plan, cfg = setup
    parts = [rank_items(plan, cfg, epochs=3, rank=r, world=3) for r in range(3)]
    assert sorted(i for part in parts for i in part) == list(range(30))
    assert parts[1][:3] == [1, 4, 7]
    assert rank_items(plan, cfg, epochs=3, rank=1, world=3, first=7) == parts[1][2:]
    assert StreamPosition(4, 10).after(7, 99) == StreamPosition(7, 100)


def test_an_epoch_of_views_holds_every_training_image_once(setup):
    plan, cfg = setup
    small = dataclasses.replace(cfg, global_size=8, global_views=1)
    uids = Counter()
    for index in range(windows_per_epoch(plan, small)):
        uids.update(rows_of(item_blocks(plan, small, seed=0, index=index))["uid"].tolist())
    assert len(uids) == plan.rows == 8000 and set(uids.values()) == {1}


def test_a_resumed_item_yields_exactly_the_rows_after_its_position(setup, monkeypatch):
    plan, cfg = setup
    whole = rows_of(item_blocks(plan, cfg, seed=0, index=12))
    assert np.array_equal(whole["row"], np.arange(len(whole["row"])))  # no bad records here
    assert set(whole["item"].tolist()) == {12}
    decoded = []
    real = stream.decode_batch
    monkeypatch.setattr(stream, "decode_batch", lambda images, *a: decoded.append(len(images)) or real(images, *a))
    rest = rows_of(item_blocks(plan, cfg, seed=0, index=12, skip=300))
    assert sum(decoded) == len(whole["row"]) - 300  # the first 300 rows were never decoded
    for key in whole:
        assert np.array_equal(rest[key], whole[key][300:]), key


def test_photometric_numbers_travel_instead_of_augmented_views(setup):
    plan, cfg = setup
    crops = next(b for b, _, _ in item_blocks(plan, cfg, seed=0, index=2, photometric=False) if b is not None)
    done = next(b for b, _, _ in item_blocks(plan, cfg, seed=0, index=2) if b is not None)
    assert crops["global"].dtype == np.uint8 and crops["global_params"].dtype == np.float32
    assert crops["global_params"].shape[:2] == crops["global"].shape[:2] and "local" not in crops
    assert np.array_equal(crops["uid"], done["uid"]) and "global_params" not in done
    assert not np.array_equal(crops["global"], done["global"])
