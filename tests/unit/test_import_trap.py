"""The repo root is on sys.path under pytest, `python -m` and in Ray workers: `platform` must stay
the standard library's module, and the package must be importable as `lejepa_platform`."""

import importlib
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.unit


def test_platform_folder_is_not_a_package():
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_platform_is_the_standard_library_with_repo_root_first_on_path():
    code = "import platform, torch; print(platform.system()); print(platform.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={"PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] in ("Linux", "Darwin", "Windows")
    assert pathlib.Path(out[1]).resolve().parent != ROOT / "platform"


def test_package_imports_from_its_source_root():
    module = importlib.import_module("lejepa_platform")
    assert pathlib.Path(module.__file__).resolve().parent == ROOT / "platform" / "lejepa_platform"
