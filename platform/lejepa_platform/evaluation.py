"""Evaluate a trained backbone on labelled data: after pretraining, and as `lejepa eval`.

Resolves what to evaluate (a checkpoint directory or an MLflow run id), loads the held-out split
in-process, runs the protocols of eval/report.py with their baselines, and attaches the results to
the MLflow run when there is one. The protocols themselves stay free of Ray and MLflow.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lejepa_platform.config import RunConfig, from_dict, set_values
from lejepa_platform.data.evalset import load_eval_set
from lejepa_platform.data.shards import split_rows
from lejepa_platform.errors import UserError
from lejepa_platform.eval.report import PROTOCOLS, evaluation_report
from lejepa_platform.tracking import download_artifact, find_run, log_artifacts_to_run, log_metrics_to_run, resolve_tracking_uri
from lejepa_platform.train.checkpoint import CONFIG_FILE, encoder_state, load_checkpoint

BACKBONE_FILE = "backbone.safetensors"
OUT_DIR = "lejepa-eval"
"""Where `lejepa eval` writes its report and plots (one folder per target)."""
REPORT_FILE = "evaluation.json"


def evaluate_weights(cfg: RunConfig, weights: dict[str, torch.Tensor], source: str, *,
                     protocols: tuple[str, ...], plots_dir: Path | None = None) -> dict[str, Any]:
    """Protocols on `source`'s fixed train/test split for `weights` (Encoder or backbone state),
    reading the features cfg.eval.features names."""
    if split_rows(source) is None:
        raise UserError(f"{source!r} has no train/test split in its manifest; evaluation needs one "
                        "(build it with `lejepa shards build`, which records a seeded split for labelled data)")
    size = cfg.eval.eval_size or cfg.data.global_size
    train = load_eval_set(source, "train", size)
    test = load_eval_set(source, "test", size)
    return evaluation_report(cfg.model, weights, train, test, protocols=protocols, seed=cfg.train.seed,
                             features=cfg.eval.features,
                             plots_dir=plots_dir)


def report_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The report's numbers as MLflow metrics: eval/<model>/<protocol metric> (model: pretrained,
    random_init, raw_pixels, lift_vs_random_init, lift_vs_raw_pixels) and eval/geometry/<name>."""
    tables = {**report["models"], **{f"lift_{k}": v for k, v in report["lift"].items()}}
    metrics = {f"eval/{model}/{key}": float(value) for model, values in tables.items() if values
               for key, value in values.items()}
    metrics.update({f"eval/geometry/{key}": float(value) for key, value in report["geometry"].items()
                    if isinstance(value, (int, float)) and not isinstance(value, bool)})
    return metrics


def parse_protocols(text: str) -> tuple[str, ...]:
    protocols = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad or not protocols:
        raise UserError(f"--protocol {text!r} is not allowed: a comma list of {', '.join(PROTOCOLS)}")
    return protocols


def load_target(target: str, tracking_uri: str) -> tuple[RunConfig, dict[str, torch.Tensor], str | None]:
    """(config, weights, run id or None) for a checkpoint directory, a run directory (its latest
    checkpoint) or an MLflow run id."""
    path = Path(target)
    if path.is_dir():
        checkpoints = sorted(p for p in path.glob("checkpoint_*") if p.is_dir())
        if not (path / CONFIG_FILE).is_file() and checkpoints:
            path = checkpoints[-1]  # a run directory: its latest checkpoint (names sort by time)
        state, cfg = load_checkpoint(path)
        return cfg, encoder_state(state.model), None
    if path.exists() or "/" in target:
        raise UserError(f"{target!r} is not a checkpoint directory (expected state.pt and {CONFIG_FILE})")
    find_run(tracking_uri, target)
    with tempfile.TemporaryDirectory(prefix="lejepa-eval-") as tmp:
        cfg = from_dict(RunConfig, json.loads(Path(download_artifact(tracking_uri, target, CONFIG_FILE, tmp)).read_text()))
        weights = load_file(download_artifact(tracking_uri, target, BACKBONE_FILE, tmp))
    return cfg, weights, target


def eval_from_cli(target: str, *, data: str, protocols: str, tracking_uri: str | None,
                  features: str | None = None) -> dict[str, Any]:
    """`lejepa eval`: report and plots under lejepa-eval/; attached to the MLflow run when given a
    run id. The probes read `features`, by default what the run's own eval.features says."""
    chosen = parse_protocols(protocols)
    uri = resolve_tracking_uri(tracking_uri or "")
    cfg, weights, run_id = load_target(target, uri)
    if features is not None:
        cfg = set_values(cfg, {"eval.features": features})
    out = Path(OUT_DIR).resolve() / re.sub(r"[^A-Za-z0-9_.-]+", "_", target.strip("/"))[-80:]
    report = evaluate_weights(cfg, weights, data, protocols=chosen, plots_dir=out)
    report.update({"target": target, "data": data})
    report_path = out / REPORT_FILE
    report_path.write_text(json.dumps(report, indent=2))
    if run_id is not None:
        plots = [p for p in report["plots"].values() if p]
        log_artifacts_to_run(uri, run_id, [str(report_path), *plots], artifact_path="eval")
        log_metrics_to_run(uri, run_id, report_metrics(report), step=0)
    return report
