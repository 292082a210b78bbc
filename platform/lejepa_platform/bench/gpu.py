"""`lejepa bench gpu`: every GPU check in one command, for the day a GPU is lent in a short slot.

Runs, within a few minutes on one GPU: the GPU tests (tests/gpu, when run from a checkout), `lejepa
bench mfu`, `lejepa bench data` (its device-placement figures), and a PRETRAIN_STEPS-step
pretraining of pipelines/imagenette_vits8.py on synthetic JPEG shards fed by the Ray Data stream.
One JSON holds every figure (schema: `result`). Without CUDA nothing runs and `skipped` says why.

The pretraining's figures come from the run itself: images/s over its training time, the view
tasks' CPU time per image (Ray Data's stats) and the GPU's idle share, the share of training time
the trainer waited for views (the data side was the bottleneck).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RECIPE = "pipelines/imagenette_vits8.py"
GPU_TESTS = "tests/gpu"
PRETRAIN_STEPS = 200
SYNTHETIC_IMAGES = 2560
"""Synthetic 160 px JPEGs the pretraining reads (Imagenette's side), about one epoch of 10 steps."""


def result(*, device: str | None, skipped: str | None, seconds: float, gpu_tests: dict | None, mfu: dict | None,
           data: dict | None, pretrain: dict | None) -> dict[str, Any]:
    """The report: every key always present, null where a part did not run."""
    parts = (gpu_tests, mfu, data, pretrain)
    return {"bench": "gpu", "device": device, "skipped": skipped, "seconds": round(seconds, 1),
            "ok": skipped is None and all(p is not None for p in parts) and gpu_tests["failed"] == 0,
            "gpu_tests": gpu_tests, "mfu": mfu, "data": data, "pretrain": pretrain}


def pytest_counts(output: str, exit_code: int) -> dict[str, int]:
    """passed / failed / skipped / errors from pytest's summary line, and its exit code."""
    counts = {key: 0 for key in ("passed", "failed", "skipped", "errors")}
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", output):
        counts["errors" if word.startswith("error") else word] += int(number)
    return {**counts, "exit_code": exit_code}


def run_gpu_tests(path: str = GPU_TESTS) -> dict[str, int] | None:
    """The GPU tests in a pytest process of their own; None outside a checkout."""
    if not Path(path).is_dir():
        return None
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path],
                          capture_output=True, text=True)
    return pytest_counts(done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "", done.returncode)


def _mfu(quick: bool) -> dict[str, Any]:
    from lejepa_platform.bench import mfu

    figures = mfu.run(quick=quick)
    return {key: figures[key] for key in ("images_per_s", "achieved_tflops", "mfu", "seconds_per_step", "workload")}


def _data(quick: bool) -> dict[str, Any]:
    from lejepa_platform.bench import data

    figures = data.run(quick=quick)["workloads"]["a_paper_views_256px_jpeg"]
    return {"views": figures["views"], **figures["placement"]["device"],
            "data_cpu_device_over_data": figures["placement"]["data_cpu_device_over_data"]}


def _pretrain(steps: int) -> dict[str, Any]:
    from lejepa_platform.bench.data import synthetic_jpegs
    from lejepa_platform.config import RunConfig
    from lejepa_platform.data.shards import build_shards
    from lejepa_platform.overrides import apply_overrides
    from lejepa_platform.recipes import load_recipe
    from lejepa_platform.run.launch import pretrain

    with tempfile.TemporaryDirectory(prefix="lejepa-bench-gpu-") as tmp:
        root = Path(tmp)
        synthetic_jpegs(root / "jpegs", SYNTHETIC_IMAGES, side=160)
        build_shards(str(root / "jpegs"), str(root / "shards"), rows_per_shard=512, test_fraction=0.0, quiet=True)
        cfg = apply_overrides(load_recipe(RECIPE, RunConfig), [
            f"data.source={root / 'shards'}", f"train.steps={steps}", "eval.enabled=false",
            f"train.storage_path={root / 'runs'}", f"track.uri=sqlite:///{root / 'mlflow.db'}",
            "track.experiment=bench-gpu"])
        summary = pretrain(cfg, quiet=True)
    images = summary["steps"] * cfg.data.batch_size
    seconds = summary["train_seconds"]
    data = summary["data"]
    return {"recipe": RECIPE, "steps": summary["steps"], "train_seconds": seconds,
            "images_per_s": round(images / seconds, 1),
            "data_cpu_ms_per_image": round(1000 * data["task_cpu_s"] / max(data["records_read"], 1), 3),
            "gpu_idle_share": round(data["trainer_wait_s"] / seconds, 4), "stream": data}


def run(quick: bool = False) -> dict[str, Any]:
    """Every GPU check (see the module doc); `quick` shortens mfu and data and trains 20 steps."""
    started = time.monotonic()
    if not torch.cuda.is_available():
        return result(device=None, skipped="no CUDA device", seconds=0.0, gpu_tests=None, mfu=None, data=None,
                      pretrain=None)
    return result(device=torch.cuda.get_device_name(), skipped=None, gpu_tests=run_gpu_tests(), mfu=_mfu(quick),
                  data=_data(quick), pretrain=_pretrain(20 if quick else PRETRAIN_STEPS),
                  seconds=time.monotonic() - started)
