"""Evaluate a trained backbone: after pretraining, and as `lejepa eval`.

Resolves what to evaluate (a checkpoint directory or an MLflow run id), loads the evaluation data
in-process (its manifest's split, else a seeded one), runs the protocols of eval/report.py with
their baselines, and attaches the results to the MLflow run when there is one. The protocols
themselves stay free of Ray and MLflow.

Unlabelled data still gets the label-free report (geometry of the held-out embeddings, pretrained
against random init): labelled protocols that were only the default are skipped with one line
saying why; protocols the user asked for (`--protocol`, or a separate `eval.data`) on data without
labels are a UserError, raised for eval.data before any worker starts (`plan_eval_data`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

import torch
from safetensors.torch import load_file

from lejepa_platform.artifacts import BACKBONE_FILE, CONFIG_FILE, REPORT_FILE
from lejepa_platform.config import RunConfig
from lejepa_platform.overrides import from_dict, set_values
from lejepa_platform.data.embeddings import is_embeddings_dir, read_embeddings
from lejepa_platform.data.evalset import SEEDED_TEST_FRACTION, EvalPlan, load_eval_splits, seeded_test_mask
from lejepa_platform.data.reader import plan_whole
from lejepa_platform.errors import UserError
from lejepa_platform.names import safe_name
from lejepa_platform.eval.features import weights_digest
from lejepa_platform.eval.report import (PROTOCOLS, Facts, embeddings_report, evaluation_report, load_encoder,
                                         missing_labels)
from lejepa_platform.tracking import download_artifact, find_run, log_artifacts_to_run, log_metrics_to_run, resolve_tracking_uri
from lejepa_platform.redact import redact_uris
from lejepa_platform.run.storage import is_remote, local_checkpoint
from lejepa_platform.train.checkpoint import encoder_state, load_checkpoint

OUT_DIR = "lejepa-eval"
"""Where `lejepa eval` writes its report and plots (one folder per target)."""

GEOMETRY_ROWS = 2048
"""Held-out images the label-free report embeds at most when the data has no labels (a seeded
sample, so a large unlabelled source is never read whole)."""
DEFAULT_PROTOCOLS = ("knn", "linear")
"""What `lejepa eval` runs without --protocol (skipped, not refused, on unlabelled data)."""


def evaluate_weights(cfg: RunConfig, weights: dict[str, torch.Tensor], plan: EvalPlan, *,
                     protocols: tuple[str, ...], required: bool, plots_dir: Path | None = None) -> dict[str, Any]:
    """The report for `weights` (Encoder or backbone state) on the planned evaluation data, reading
    the features cfg.eval.features names: `protocols` when the data has labels, else the label-free
    part alone (UserError instead when `required`). The report also says which split it used
    ("split": "own" or "seeded", see data/evalset.py)."""
    size = cfg.eval.eval_size or cfg.data.global_size
    seed = cfg.train.seed
    if plan.whole.labelled == 0:
        splits = load_eval_splits(plan, size, seed=seed, need_train=False, max_rows=GEOMETRY_ROWS)
    else:
        splits = load_eval_splits(plan, size, seed=seed)
    skipped = _skip_reason(plan.source, plan.whole.labelled, plan.whole.rows, splits.train, splits.test, protocols,
                           required)
    report = evaluation_report(cfg.model, weights, None if skipped else splits.train, splits.test,
                               protocols=() if skipped else protocols, seed=seed, features=cfg.eval.features,
                               plots_dir=plots_dir, skipped=skipped)
    report["split"] = splits.split
    return report


def evaluate_embeddings(cfg: RunConfig, weights: dict[str, torch.Tensor], where: str, *, protocols: tuple[str, ...],
                        required: bool, features: str | None, plots_dir: Path | None = None) -> dict[str, Any]:
    """The report of the pretrained backbone from the embeddings `lejepa embed` wrote to `where`:
    the same split as `evaluate_weights` would use on the source, the same protocols on the same
    features, without the baselines (they need the images)."""
    embeddings = read_embeddings(where)
    manifest = embeddings.manifest
    if weights_digest(load_encoder(cfg.model, weights, cfg.train.seed).backbone) != manifest["backbone_sha256"]:
        raise UserError(f"{where!r} holds embeddings of another backbone ({manifest['run']!r}); evaluate that run, "
                        f"or embed this one with `lejepa embed`")
    if features is not None and features != manifest["features"]:
        raise UserError(f"--features {features}: {where!r} holds {manifest['features']} features; leave --features "
                        f"out, or embed with --features {features}")
    labels, feats = embeddings.labels, torch.from_numpy(embeddings.features)
    if manifest["split"] == "own":
        test = np.array([side == "test" for side in embeddings.split])
        train = np.array([side == "train" for side in embeddings.split])
    else:
        test = seeded_test_mask(labels, SEEDED_TEST_FRACTION, cfg.train.seed)
        train = ~test
    sides = {name: SimpleNamespace(labels=labels[mask]) for name, mask in (("train", train), ("test", test))}
    skipped = _skip_reason(where, manifest["labelled"], manifest["count"], sides["train"], sides["test"], protocols,
                           required)
    facts = Facts(manifest["backbone"], manifest["embed_dim"], manifest["features"], manifest["dimension"],
                  manifest["image_size"], "embeddings")
    report = embeddings_report(facts, None if skipped else (feats[train], labels[train]), (feats[test], labels[test]),
                               protocols=() if skipped else protocols, seed=cfg.train.seed, plots_dir=plots_dir,
                               skipped=skipped)
    report["split"] = manifest["split"]
    return report


def _skip_reason(source: str, labelled: int | None, rows: int, train: Any, test: Any, protocols: tuple[str, ...],
                 required: bool) -> str | None:
    """Why the labelled protocols are skipped (no labels at all, or none on one side), else None;
    UserError instead when they were `required`."""
    if labelled == 0:
        reason = f"{source!r} has no labels (all {rows} images are label -1)"
    else:
        missing = missing_labels(train, "train") or missing_labels(test, "test")
        reason = f"{source!r}: {missing}" if missing else None
    if reason and required:
        raise UserError(f"{reason}; the {', '.join(protocols)} evaluation needs labelled images")
    return f"labelled protocols ({', '.join(protocols)}) skipped: {reason}" if reason else None


def plan_eval_data(cfg: RunConfig) -> EvalPlan | None:
    """The plan of eval.data, checked: it exists, and has labels when known without reading images.
    Called before any worker starts, so a bad probe set costs a second, not a training run. None
    when eval.data is empty (the run evaluates on data.source) or evaluation is off."""
    if not cfg.eval.enabled or not cfg.eval.data:
        return None
    try:
        plan = plan_whole(cfg.eval.data)
    except UserError as err:
        raise UserError(f"eval.data: {err}") from None
    if plan.labelled == 0:
        raise UserError(f"eval.data {cfg.eval.data!r} has no labels (all {plan.rows} images are label -1), but "
                        f"eval.protocols = {','.join(cfg.eval.protocols)} need labelled images; give a labelled "
                        f"source, or leave eval.data empty for the label-free report of data.source")
    return EvalPlan.of(plan)


def report_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The report's numbers as MLflow metrics: eval/<model>/<protocol metric> (model: pretrained,
    random_init, raw_pixels, lift_vs_random_init, lift_vs_raw_pixels) and
    eval/geometry/<model>/<name> (model: pretrained, random_init)."""
    tables = {**report["models"], **{f"lift_{k}": v for k, v in report["lift"].items()}}
    metrics = {f"eval/{model}/{key}": float(value) for model, values in tables.items() if values
               for key, value in values.items()}
    metrics.update({f"eval/geometry/{model}/{key}": float(value) for model, values in report["geometry"].items()
                    if values for key, value in values.items()
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
    checkpoint), either behind a URI (s3://...), or an MLflow run id."""
    if is_remote(target):
        with local_checkpoint(target) as directory:
            return load_target(str(directory), tracking_uri)
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


def eval_from_cli(target: str, *, data: str, protocols: str | None, tracking_uri: str | None,
                  features: str | None = None) -> dict[str, Any]:
    """`lejepa eval`: report and plots under lejepa-eval/; attached to the MLflow run when given a
    run id. The probes read `features`, by default what the run's own eval.features says. Without
    `protocols` (a comma list) the DEFAULT_PROTOCOLS run when `data` has labels. `data` may be an
    embeddings directory of `lejepa embed`: its features are read instead of computed."""
    chosen = parse_protocols(protocols) if protocols is not None else DEFAULT_PROTOCOLS
    precomputed = is_embeddings_dir(data)
    # a missing or unreadable source fails before the checkpoint is loaded
    plan = None if precomputed else EvalPlan.of(plan_whole(data))
    uri = resolve_tracking_uri(tracking_uri or "")
    cfg, weights, run_id = load_target(target, uri)
    out = Path(OUT_DIR).resolve() / safe_name(target.strip("/"))[-80:]
    if plan is None:
        report = evaluate_embeddings(cfg, weights, data, protocols=chosen, required=protocols is not None,
                                     features=features, plots_dir=out)
    else:
        if features is not None:
            cfg = set_values(cfg, {"eval.features": features})
        report = evaluate_weights(cfg, weights, plan, protocols=chosen, required=protocols is not None,
                                  plots_dir=out)
    report.update({"target": target, "data": data})
    report_path = out / REPORT_FILE
    report_path.write_text(json.dumps(redact_uris(report), indent=2))
    if run_id is not None:
        plots = [p for p in report["plots"].values() if p]
        log_artifacts_to_run(uri, run_id, [str(report_path), *plots], artifact_path="eval")
        log_metrics_to_run(uri, run_id, report_metrics(report), step=0)
    return report
