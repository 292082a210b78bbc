"""`lejepa bench gpu` on a machine without CUDA: it skips cleanly, and its JSON has one schema."""

import json
import subprocess
import sys

import pytest
import torch

from lejepa_platform.bench import gpu

pytestmark = pytest.mark.unit

KEYS = {"bench", "device", "skipped", "seconds", "ok", "gpu_tests", "mfu", "data", "pretrain"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_the_command_skips_with_the_whole_schema():
    done = subprocess.run([sys.executable, "-m", "lejepa_platform.cli", "bench", "gpu", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report) == KEYS and report["skipped"] == "no CUDA device" and report["ok"] is False
    assert report["bench"] == "gpu" and all(report[k] is None for k in ("device", "gpu_tests", "mfu", "data", "pretrain"))


def test_pytest_counts_read_a_real_summary_line(tmp_path):
    (tmp_path / "test_three.py").write_text(
        "import pytest\n"
        "def test_ok():\n    assert True\n"
        "def test_bad():\n    assert False\n"
        "@pytest.mark.skip(reason='x')\ndef test_skip():\n    pass\n")
    assert gpu.run_gpu_tests(str(tmp_path)) == {"passed": 1, "failed": 1, "skipped": 1, "errors": 0, "exit_code": 1}
    assert gpu.run_gpu_tests(str(tmp_path / "missing")) is None


def test_ok_needs_every_part_and_no_failed_test():
    parts = {"gpu_tests": {"passed": 7, "failed": 0, "skipped": 0, "errors": 0, "exit_code": 0},
             "mfu": {"mfu": 0.4}, "data": {"images_per_s": 900.0}, "pretrain": {"steps": 200}}
    report = gpu.result(device="H200", skipped=None, seconds=301.04, **parts)
    assert set(report) == KEYS and report["ok"] is True and report["seconds"] == 301.0
    assert gpu.result(device="H200", skipped=None, seconds=1, **{**parts, "mfu": None})["ok"] is False
    failed = {**parts, "gpu_tests": {**parts["gpu_tests"], "failed": 1}}
    assert gpu.result(device="H200", skipped=None, seconds=1, **failed)["ok"] is False
