"""How the pipeline sizes its blocks, and the row counts it plans them from (no cluster)."""

import dataclasses

import pytest

from lejepa_platform.config import DataConfig
from lejepa_platform.data.pipeline import blocks_in_flight, stream_block_rows
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
    assert blocks_in_flight(SMALL, 128) == 2
    assert stream_block_rows(PAPER, 128) == 35  # 35 rows are 16 MB of the paper's views
    assert blocks_in_flight(PAPER, 128) == 30  # 8 x 128 rows in blocks of 35: ceil(1024 / 35)
    one = dataclasses.replace(SMALL, prefetch_batches=1)
    assert (stream_block_rows(one, 128), blocks_in_flight(one, 128)) == (64, 2)  # never fewer than two
    assert (stream_block_rows(one, 1), blocks_in_flight(one, 1)) == (1, 2)


@pytest.mark.parametrize("split", ["train", "test", "all"])
def test_unit_rows_are_the_rows_a_unit_loads(split):
    plan = plan_source("builtin:fashion-mnist-10k", split)
    counts = [unit_rows(unit, plan) for unit in plan.units]
    assert counts == [sum(len(ids) for _, _, ids in load_unit(unit, plan)) for unit in plan.units]
    assert sum(counts) == plan.rows == {"train": 8000, "test": 2000, "all": 10_000}[split]
