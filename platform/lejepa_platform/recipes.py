"""Load recipes (pipelines/*.py, sweeps/*.py) by file path.

A recipe is a plain Python file, not part of a package: `file.py` calls its `config()` function,
`file.py:name` calls `name()`. The function returns a config object of the expected type.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from lejepa_platform.errors import UserError


def load_recipe(spec: str, expected: type, default_function: str = "config") -> Any:
    """Import the file named by `spec` and return what its function builds."""
    path_text, _, function = spec.partition(":")
    path = Path(path_text)
    if not path.is_file():
        raise UserError(f"recipe file {path_text!r} does not exist (expected a .py file, optionally file.py:function)")
    if path.suffix != ".py":
        raise UserError(f"recipe {path_text!r} is not a .py file")
    module_name = f"_lejepa_recipe_{path.stem}_{abs(hash(path.resolve()))}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    assert loader_spec is not None and loader_spec.loader is not None
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module
    loader_spec.loader.exec_module(module)
    name = function or default_function
    builder = getattr(module, name, None)
    if not callable(builder):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise UserError(f"recipe {path_text!r} has no function {name!r}; functions found: {', '.join(found) or 'none'}")
    result = builder()
    if not isinstance(result, expected):
        raise UserError(f"recipe {spec!r} returned {type(result).__name__}, expected {expected.__name__}")
    return result
