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

from lejepa_platform.artifacts import BACKBONE_FILE, LOSS_CURVE_FILE, REPORT_FILE, STREAM_STATS_FILE
from lejepa_platform.config import RunConfig
from lejepa_platform.console import say
from lejepa_platform.data.evalset import EvalPlan
from lejepa_platform.data.pipeline import DataStats
from lejepa_platform.eval.plots import plot_loss_curve
from lejepa_platform.run.evaluate import evaluate_weights, report_metrics
from lejepa_platform.model.flops import training_flops_per_image
from lejepa_platform.tracking import Tracker
from lejepa_platform.train.checkpoint import backbone_state, encoder_state, load_checkpoint

CURVE_KEYS = ("loss/total", "loss/prediction", "loss/sigreg")


def finalize_run(cfg: RunConfig, evaluation: EvalPlan | None, tracker: Tracker, checkpoint_dir: Path, *,
                 quiet: bool = False) -> dict[str, Any]:
    """Attach, then evaluate on the planned `evaluation` data (None: no evaluation) and log;
    returns the summary printed by `lejepa pretrain`."""
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
        report = _evaluate(cfg, evaluation, state.model, out / "eval", quiet)
        if report is not None:
            for name, path in report["plots"].items():
                if path:
                    tracker.log_artifact(path)
                    report["plots"][name] = Path(path).name  # where it is among the run's artifacts
            summary["evaluation"] = report
            tracker.log_dict(report, REPORT_FILE)
            tracker.log_metrics(report_metrics(report), step=state.step)
    return summary


def _evaluate(cfg: RunConfig, evaluation: EvalPlan | None, model_state: dict[str, torch.Tensor], plots_dir: Path,
              quiet: bool) -> dict[str, Any] | None:
    """The evaluation report on eval.data (else data.source): probes when it has labels, the
    label-free part always."""
    if evaluation is None:
        return None
    say(quiet, f"evaluating frozen features of {evaluation.source} (pretrained, random init, raw pixels) ...")
    report = evaluate_weights(cfg, encoder_state(model_state), evaluation, protocols=cfg.eval.protocols,
                              required=bool(cfg.eval.data), plots_dir=plots_dir)
    if report["skipped"]:
        say(quiet, report["skipped"])
    return report


def log_data_figures(tracker: Tracker, stats: DataStats, step: int) -> dict[str, Any]:
    """Record counts and Ray Data's figures of the ranks' streams, as metrics (data/...) and one
    artifact with each rank's `Dataset.stats()`; returns the summary's "data" part."""
    counts = stats.log_summary()
    streams = stats.streams()
    metrics = {"data/records_read": counts["records"], "data/records_skipped": counts["skipped"]}
    if streams:
        figures = list(streams.values())
        metrics.update({"data/rows_per_s": sum(f.rows_per_s for f in figures),
                        "data/trainer_wait_s": max(f.consumer_wait_s for f in figures),
                        "data/backpressure_s": sum(f.backpressure_s for f in figures),
                        "data/task_cpu_s": sum(f.task_cpu_s for f in figures)})
        with tempfile.TemporaryDirectory(prefix="lejepa-data-") as tmp:
            path = Path(tmp) / STREAM_STATS_FILE
            path.write_text("\n".join(f"# rank {rank}: {f.rows} rows in {f.seconds:.1f} s\n{f.text}"
                                       for rank, f in sorted(streams.items())))
            tracker.log_artifact(str(path))
    tracker.log_metrics(metrics, step=step)
    return {"records_read": counts["records"], "skipped": counts["reasons"],
            **{key.split("/", 1)[1]: round(value, 3) for key, value in metrics.items() if key not in
               ("data/records_read", "data/records_skipped")}}
