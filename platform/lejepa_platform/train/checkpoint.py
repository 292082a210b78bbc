"""Checkpoint files: everything a run needs to continue exactly, loadable with weights_only=True.

A checkpoint directory holds `state.pt` (model + probe, optimizer, step, RNG, training time,
whether the run has ended, every rank's data position, metric rows not yet in MLflow) and
`config.json` (the resolved RunConfig, passwords in URIs masked). `state.pt` is written under a
temporary name and renamed, so a crash never leaves a file that looks complete; Ray Train then
copies the directory into storage only after it is whole.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lejepa_platform.artifacts import CONFIG_FILE
from lejepa_platform.config import RunConfig, to_dict
from lejepa_platform.overrides import from_dict
from lejepa_platform.errors import UserError
from lejepa_platform.redact import redact_params

STATE_FILE = "state.pt"


@dataclass
class TrainState:
    """What survives a restart besides the config."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    step: int
    rng: dict[str, torch.Tensor]
    pending_metrics: list[dict[str, float]] = field(default_factory=list)
    """Metric rows logged since the previous checkpoint; replayed into MLflow on restore if missing."""
    train_seconds: float = 0.0
    """Training time so far (what train.time_budget_s counts)."""
    finished: bool = False
    """The run's last step is done (all train.steps, or the time budget ran out)."""
    positions: list[tuple[int, int]] = field(default_factory=list)
    """Each rank's data position (item, row) after this step (data/stream.py); empty: from the start."""


def save_checkpoint(directory: str | os.PathLike, state: TrainState, cfg: RunConfig) -> Path:
    """Write `state` and `cfg` into `directory` (created), atomically per file."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": state.model,
        "optimizer": state.optimizer,
        "step": state.step,
        "rng": state.rng,
        "pending_metrics": state.pending_metrics,
        "train_seconds": state.train_seconds,
        "finished": state.finished,
        "positions": [list(p) for p in state.positions],
    }
    _atomic_write(path / STATE_FILE, lambda f: torch.save(payload, f))
    _atomic_write(path / CONFIG_FILE, lambda f: f.write(json.dumps(redact_params(to_dict(cfg)), indent=2).encode()))
    return path


def load_checkpoint(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[TrainState, RunConfig]:
    """Read a checkpoint written by `save_checkpoint`; only tensors and plain containers are unpickled."""
    path = Path(directory)
    state_file, config_file = path / STATE_FILE, path / CONFIG_FILE
    if not state_file.is_file() or not config_file.is_file():
        raise UserError(f"{path} is not a checkpoint directory (expected {STATE_FILE} and {CONFIG_FILE})")
    payload = torch.load(state_file, map_location=map_location, weights_only=True)
    cfg = from_dict(RunConfig, json.loads(config_file.read_text()))
    state = TrainState(model=payload["model"], optimizer=payload["optimizer"], step=int(payload["step"]),
                       rng=payload["rng"], pending_metrics=list(payload.get("pending_metrics", [])),
                       train_seconds=float(payload.get("train_seconds", 0.0)),
                       finished=bool(payload.get("finished", False)),
                       positions=[(int(i), int(r)) for i, r in payload.get("positions", [])])
    return state, cfg


def capture_rng() -> dict[str, torch.Tensor]:
    """CPU (and current CUDA device) RNG state; views and directions are seeded separately."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def restore_rng(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["torch"].cpu())
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"].cpu())


def backbone_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone's own weights (keys as in the timm model) from a full model state dict."""
    prefix = "encoder.backbone."
    return {k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)}


def encoder_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone + projector weights (keys as in `Encoder`) from a full model state dict."""
    prefix = "encoder."
    return {k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)}


def _atomic_write(target: Path, write) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
