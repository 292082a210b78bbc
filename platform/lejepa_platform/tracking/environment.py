"""Environment tags of a run: code version, library versions and hardware, so it can be reproduced."""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import platform
import re
import subprocess

_ENV_PACKAGES = ("ray", "torch", "timm", "mlflow")


def run_environment_tags() -> dict[str, str]:
    """Code version, library versions and hardware, so a run can be reproduced (no hostname)."""
    tags = {"mlflow.source.git.commit": _git_commit(), "version.python": platform.python_version()}
    for package in _ENV_PACKAGES:
        try:
            tags[f"version.{package}"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            tags[f"version.{package}"] = "not installed"
    tags["hardware.cpu_count"] = str(os.cpu_count() or 0)
    gpus = _gpu_names()
    tags["hardware.gpu_count"] = str(len(gpus))
    tags["hardware.gpus"] = ", ".join(gpus) if gpus else "none"
    return tags


def _git_commit() -> str:
    here = pathlib.Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else "unknown"


def _gpu_names() -> list[str]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
