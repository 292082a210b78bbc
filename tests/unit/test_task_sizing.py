"""How the Ray Data pipeline cuts its work into tasks (pure arithmetic over the plan, no cluster)."""

import pytest

from lejepa_platform.config import DataConfig
from lejepa_platform.data.pipeline import TASK_BYTES, units_per_task
from lejepa_platform.data.reader import UNIT_ROWS, block_rows, plan_source, view_bytes

pytestmark = pytest.mark.unit

PAPER = DataConfig(global_views=2, global_size=224, local_views=6, local_size=96)
SMALL = DataConfig(global_views=4, global_size=32, local_views=0)


def test_view_bytes_and_block_rows():
    assert view_bytes(PAPER) == 3 * (2 * 224 ** 2 + 6 * 96 ** 2) == 466_944
    assert view_bytes(SMALL) == 3 * 4 * 32 ** 2 == 12_288
    assert block_rows(PAPER) == 16 * 2**20 // 466_944 == 35
    assert block_rows(SMALL) == UNIT_ROWS  # 1365 rows would fit 16 MB; a block never exceeds a unit


def test_cheap_units_are_grouped_and_expensive_ones_are_not():
    plan = plan_source("builtin:fashion-mnist-10k", "train")
    assert (plan.rows, len(plan.units)) == (8000, 20)
    # 400 train rows per unit: 4.9 MB of 4 x 32 px views, 187 MB of paper views
    assert units_per_task(plan, view_bytes(SMALL)) == int(TASK_BYTES // (12_288 * 400)) == 13
    assert units_per_task(plan, view_bytes(PAPER)) == 1
