"""Imports go one way: a module imports only from its own layer or below.

The layer map is written once, here. Every module's imports are read from its source (the ast,
function-level imports included: a lazy import is still a dependency), so nothing is imported to
run this test.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = "lejepa_platform"
ROOT = Path(__file__).resolve().parents[2] / "platform" / PACKAGE

LAYERS: dict[int, tuple[str, ...]] = {
    5: ("cli",),
    4: ("run", "sweep", "bench", "cluster"),  # run orchestration
    3: ("train", "eval"),
    2: ("data", "model", "loss"),
    1: ("", "config", "overrides", "tracking", "distributed", "errors", "console", "artifacts", "capacity",
        "schedule", "names", "batching", "redact", "ray_env", "defaults", "recipes"),
}
"""Module prefixes (relative to the package) by layer, highest first; the longest matching prefix
decides. "" is the package's own __init__ (its version string)."""

def layer_of(module: str) -> int:
    relative = module[len(PACKAGE) + 1:] if module != PACKAGE else ""
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            if relative == prefix or (prefix and relative.startswith(prefix + ".")) or (prefix == "" and not relative):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), layer)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return best[1]


def module_name(path: Path, root: Path) -> str:
    parts = [PACKAGE, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path) -> set[str]:
    """Package modules `path` imports: `import a.b`, `from a.b import c` (c itself when it is a module)."""
    here = module_name(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if _is_module(f"{base}.{alias.name}", root))
    return {name for name in found if name == PACKAGE or name.startswith(PACKAGE + ".")}


def _is_module(name: str, root: Path) -> bool:
    relative = Path(*name.split(".")[1:])
    return (root / relative).with_suffix(".py").is_file() or (root / relative / "__init__.py").is_file()


def upward_imports(root: Path = ROOT) -> set[tuple[str, str]]:
    """Every (importer, imported) pair where the imported module sits in a higher layer."""
    pairs = set()
    for path in sorted(root.rglob("*.py")):
        importer = module_name(path, root)
        for imported in imported_modules(path, root):
            if layer_of(imported) > layer_of(importer):
                pairs.add((importer, imported))
    return pairs


def test_no_module_imports_from_a_higher_layer():
    found = sorted(upward_imports())
    assert not found, "imports against the layer map (layer of importer < layer of imported):\n" + "\n".join(
        f"  {a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})" for a, b in found)


def test_every_module_has_a_layer():
    for path in ROOT.rglob("*.py"):
        layer_of(module_name(path, ROOT))


def test_a_back_import_is_caught(tmp_path):
    """The check itself: a loss module importing the trainer is reported."""
    fake = tmp_path / PACKAGE
    (fake / "loss").mkdir(parents=True)
    (fake / "train").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "train" / "__init__.py").write_text("")
    (fake / "train" / "step.py").write_text("")
    (fake / "loss" / "__init__.py").write_text("")
    (fake / "loss" / "bad.py").write_text("def f():\n    from lejepa_platform.train import step\n")
    assert upward_imports(fake) == {(f"{PACKAGE}.loss.bad", f"{PACKAGE}.train"),
                                    (f"{PACKAGE}.loss.bad", f"{PACKAGE}.train.step")}
