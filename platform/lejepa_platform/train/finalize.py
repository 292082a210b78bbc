"""After training: evaluate the final backbone and attach the run's artifacts on the driver.

Artifacts: the final backbone as safetensors (loads into the same timm model), the loss curve,
the evaluation report. Metrics: frozen-feature probes of the pretrained backbone next to the same
backbone at random init and raw pixels, parameter count and a FLOPs estimate for scaling analysis.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from lejepa_platform.config import RunConfig
from lejepa_platform.console import say
from lejepa_platform.data.shards import split_rows
from lejepa_platform.eval.plots import plot_loss_curve
from lejepa_platform.evaluation import BACKBONE_FILE, REPORT_FILE, evaluate_weights, report_metrics
from lejepa_platform.model import build_encoder, use_plain_attention
from lejepa_platform.tracking import Tracker
from lejepa_platform.train.checkpoint import backbone_state, encoder_state, load_checkpoint

CURVE_KEYS = ("loss/total", "loss/prediction", "loss/sigreg")


def training_flops_per_image(cfg: RunConfig) -> float:
    """Forward FLOPs of all views of one image (counted by torch), times 3 for forward + backward.

    Attention is counted through the plain matmul path: torch's FLOP counter has no formula for the
    fused CPU attention kernel and would leave the T^2 terms out (5.6 % of ViT-S/16's 2 + 6 views).
    """
    encoder = build_encoder(cfg.model).eval()
    use_plain_attention(encoder)
    d = cfg.data
    global_views = torch.zeros(1, d.global_views, 3, d.global_size, d.global_size)
    local_views = torch.zeros(1, d.local_views, 3, d.local_size, d.local_size) if d.local_views else None
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        encoder(global_views, local_views)
    return 3.0 * counter.get_total_flops()


def finalize_run(cfg: RunConfig, tracker: Tracker, checkpoint_dir: Path, *, quiet: bool = False) -> dict[str, Any]:
    """Evaluate, log and attach; returns the summary printed by `lejepa pretrain`."""
    state, _ = load_checkpoint(checkpoint_dir)
    params = sum(v.numel() for v in backbone_state(state.model).values())
    flops = training_flops_per_image(cfg) * state.step * cfg.data.batch_size
    tracker.log_metrics({"model/params": float(params), "compute/flops": flops}, step=state.step)
    stopped_by = "steps" if state.step >= cfg.train.steps else "time budget"
    summary: dict[str, Any] = {"steps": state.step, "stopped_by": stopped_by, "train_seconds": round(state.train_seconds, 1),
                               "backbone_params": params, "compute_flops": flops}

    history = {key: tracker.history(key) for key in CURVE_KEYS}
    final = {key: points[-1][1] for key, points in history.items() if points}
    summary["final_metrics"] = final

    with tempfile.TemporaryDirectory(prefix="lejepa-final-") as tmp:
        out = Path(tmp)
        save_file({k: v.contiguous() for k, v in backbone_state(state.model).items()}, out / BACKBONE_FILE,
                  metadata={"backbone": cfg.model.backbone, "backbone_kwargs": json.dumps(cfg.model.backbone_kwargs)})
        tracker.log_artifact(str(out / BACKBONE_FILE))
        if history[CURVE_KEYS[0]]:
            plot_loss_curve([s for s, _ in history[CURVE_KEYS[0]]],
                            {k: [x for _, x in v] for k, v in history.items()}, out / "loss_curve.png")
            tracker.log_artifact(str(out / "loss_curve.png"))
        report = _evaluate(cfg, state.model, quiet)
        if report is not None:
            summary["evaluation"] = report
            tracker.log_dict(report, REPORT_FILE)
            tracker.log_metrics(report_metrics(report), step=state.step)
    return summary


def _evaluate(cfg: RunConfig, model_state: dict[str, torch.Tensor], quiet: bool) -> dict[str, Any] | None:
    """Frozen-feature probes on the held-out split, when the source has labels and a fixed split."""
    if not cfg.eval.enabled:
        return None
    if split_rows(cfg.data.source) is None:
        say(quiet, "evaluation skipped: the data has no train/test split in its manifest")
        return None
    say(quiet, "evaluating frozen features (pretrained, random init, raw pixels) ...")
    return evaluate_weights(cfg, encoder_state(model_state), cfg.data.source, protocols=cfg.eval.protocols)

