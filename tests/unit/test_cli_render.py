"""The human form of a CLI result: YAML that reads back as the `--json` form (floats shortened)."""

import math
from pathlib import Path

import pytest
import yaml

from lejepa_platform.cli import render

pytestmark = pytest.mark.unit


def test_render_is_block_yaml_in_key_order_with_short_floats_and_strings_for_the_rest():
    result = {"run": "r1", "steps": 640, "loss": 0.123456789, "path": Path("/tmp/x"), "nested": {"b": [1, 2], "a": None},
              "rows": [{"k": 1.5}], "empty": {}}
    text = render(result)
    assert text == ("run: r1\nsteps: 640\nloss: 0.123457\npath: /tmp/x\nnested:\n  b:\n  - 1\n  - 2\n  a: null\n"
                    "rows:\n- k: 1.5\nempty: {}")
    assert yaml.safe_load(text) == {**result, "loss": 0.123457, "path": "/tmp/x"}


def test_render_keeps_non_finite_numbers_readable():
    assert math.isnan(yaml.safe_load(render({"x": float("nan")}))["x"])
