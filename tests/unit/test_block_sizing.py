"""How the pipeline sizes its blocks, and the row counts it plans them from (no cluster)."""

import dataclasses

import pytest

from lejepa_platform.config import DataConfig
from lejepa_platform.data.pipeline import prefetch_budget, row_bytes, stream_block_rows
from lejepa_platform.data.reader import UNIT_ROWS, block_rows, load_unit, plan_source, unit_rows, view_bytes

pytestmark = pytest.mark.unit

PAPER = DataConfig(global_views=2, global_size=224, local_views=6, local_size=96)
SMALL = DataConfig(global_views=4, global_size=32, local_views=0)


def test_view_bytes_and_block_rows():
    assert view_bytes(PAPER) == 3 * (2 * 224 ** 2 + 6 * 96 ** 2) == 466_944
    assert view_bytes(SMALL) == 3 * 4 * 32 ** 2 == 12_288
    assert block_rows(PAPER) == 16 * 2**20 // 466_944 == 35
    assert block_rows(SMALL) == UNIT_ROWS  # 1365 rows would fit 16 MB; a block never exceeds a unit


def test_two_blocks_hold_the_prefetch_unless_too_big():
    assert stream_block_rows(SMALL, 128) == 512  # 8 batches of 128 in two blocks, within 16 MB of views
    assert stream_block_rows(PAPER, 128) == 35  # 35 rows are 16 MB of the paper's views
    one = dataclasses.replace(SMALL, prefetch_batches=1)
    assert stream_block_rows(one, 128) == 64 and stream_block_rows(one, 1) == 1


def test_the_prefetch_budget_is_the_prefetched_batches_in_bytes_and_at_least_two_blocks():
    # A row: its uint8 views, 14 float32 numbers per view when the trainer applies the photometric
    # ops, and uid, item, row and label as int64.
    assert row_bytes(SMALL, photometric=True) == 12_288 + 32
    assert row_bytes(PAPER, photometric=False) == 466_944 + 8 * 56 + 32
    assert prefetch_budget(SMALL, 128, photometric=True) == 8 * 128 * (12_288 + 32)  # = two blocks of 512
    assert prefetch_budget(PAPER, 128, photometric=True) == 8 * 128 * (466_944 + 32)  # about 29 blocks of 35 rows
    one = dataclasses.replace(SMALL, prefetch_batches=1)
    assert prefetch_budget(one, 1, photometric=True) == 2 * (12_288 + 32)  # one row a batch: two blocks of one


@pytest.mark.parametrize("split", ["train", "test", "all"])
def test_unit_rows_are_the_rows_a_unit_loads(split):
    plan = plan_source("builtin:fashion-mnist-10k", split)
    counts = [unit_rows(unit, plan) for unit in plan.units]
    assert counts == [sum(len(ids) for _, _, ids in load_unit(unit, plan)) for unit in plan.units]
    assert sum(counts) == plan.rows == {"train": 8000, "test": 2000, "all": 10_000}[split]
