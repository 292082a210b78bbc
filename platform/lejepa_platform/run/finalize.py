"""After training: attach the run's artifacts and evaluate the final backbone, on the driver.

First the metric rows the workers could not send (a tracking server that was away: they are in the
final checkpoint), once the server answers again within track.wait_s. Then artifacts, in this
order so that a failure later still leaves the trained weights with the run: the final backbone as
safetensors (loads into the same timm model), the loss curve (one panel per term), then the
evaluation report with its spectrum and patch-PCA pictures. Metrics: frozen-feature
probes of the pretrained backbone next to the same backbone at random init and raw pixels when the
evaluation data has labels, the label-free geometry of both backbones always, parameter count and
a FLOPs estimate for scaling analysis.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lejepa_platform.artifacts import BACKBONE_FILE, LOSS_CURVE_FILE, REPORT_FILE
from lejepa_platform.config import RunConfig
from lejepa_platform.console import say
from lejepa_platform.eval.plots import plot_loss_curve
from lejepa_platform.run.evaluate import evaluate_weights, report_metrics
from lejepa_platform.model.flops import training_flops_per_image
from lejepa_platform.tracking import Tracker
from lejepa_platform.train.checkpoint import backbone_state, encoder_state, load_checkpoint

CURVE_KEYS = ("loss/total", "loss/prediction", "loss/sigreg")


def finalize_run(cfg: RunConfig, tracker: Tracker, checkpoint_dir: Path, *, quiet: bool = False) -> dict[str, Any]:
    """Evaluate, log and attach; returns the summary printed by `lejepa pretrain`."""
    state, _ = load_checkpoint(checkpoint_dir)
    tracker.deliver(state.pending_metrics, CURVE_KEYS[0], wait_s=cfg.track.wait_s)
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
                            {k: [x for _, x in v] for k, v in history.items()}, out / LOSS_CURVE_FILE)
            tracker.log_artifact(str(out / LOSS_CURVE_FILE))
        report = _evaluate(cfg, state.model, out / "eval", quiet)
        if report is not None:
            for name, path in report["plots"].items():
                if path:
                    tracker.log_artifact(path)
                    report["plots"][name] = Path(path).name  # where it is among the run's artifacts
            summary["evaluation"] = report
            tracker.log_dict(report, REPORT_FILE)
            tracker.log_metrics(report_metrics(report), step=state.step)
    return summary


def _evaluate(cfg: RunConfig, model_state: dict[str, torch.Tensor], plots_dir: Path,
              quiet: bool) -> dict[str, Any] | None:
    """The evaluation report on eval.data (else data.source): probes when it has labels, the
    label-free part always."""
    if not cfg.eval.enabled:
        return None
    source = cfg.eval.data or cfg.data.source
    say(quiet, f"evaluating frozen features of {source} (pretrained, random init, raw pixels) ...")
    report = evaluate_weights(cfg, encoder_state(model_state), source, protocols=cfg.eval.protocols,
                              required=bool(cfg.eval.data), plots_dir=plots_dir)
    if report["skipped"]:
        say(quiet, report["skipped"])
    return report
