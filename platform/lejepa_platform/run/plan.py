"""One plan per run, made before any worker starts: the config, the data it trains and evaluates on
(each source planned once: its units, rows and class names from manifests, footers, listings or tar
indexes), the length of the order, the run's name, storage and MLflow ids.

Everything that can be checked without workers is checked here, so bad input fails in a second with
one line. The workers get the part they need (`WorkerPlan`); finalisation and evaluation read the
same plan instead of planning the sources again.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

from lejepa_platform.config import RunConfig, TrainConfig
from lejepa_platform.data.evalset import EvalPlan
from lejepa_platform.data.reader import UNIT_ROWS, Plan, plan_whole, with_split
from lejepa_platform.data.stream import window_units, windows_per_epoch
from lejepa_platform.errors import UserError
from lejepa_platform.model import check_backbone
from lejepa_platform.run.evaluate import plan_eval_data
from lejepa_platform.run.storage import absolute_storage, read_run_record, recorded_tracking_uri, run_exists
from lejepa_platform.tracking import resolve_tracking_uri
from lejepa_platform.train.loop import WorkerPlan


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What one pretraining run is, decided once."""

    cfg: RunConfig
    data: Plan
    """The training split of data.source."""
    evaluation: EvalPlan | None
    """What the end-of-run evaluation reads (eval.data, else data.source, sides resolved); None when off."""
    num_classes: int
    """Class names of data.source's plan: the online probe's outputs (0: no probe)."""
    epochs: int
    windows_per_epoch: int
    name: str
    storage: str
    """Absolute storage path (or URI) the run directory lives under."""
    resumed: bool
    tracking_uri: str
    mlflow_run_id: str | None
    """The MLflow run (known at once when resuming; set by `tracked` for a new run)."""

    @property
    def run_dir(self) -> str:
        return f"{self.storage}/{self.name}"

    @property
    def resume_command(self) -> str:
        """The command that continues this run (naming its storage when that is not the default)."""
        default = self.cfg.train.storage_path == TrainConfig.storage_path
        return f"lejepa pretrain --resume {self.name}" + ("" if default else f" --set train.storage_path={self.storage}")

    def tracked(self, mlflow_run_id: str) -> RunPlan:
        return dataclasses.replace(self, mlflow_run_id=mlflow_run_id)

    def for_workers(self, *, board: Any, data_stats: Any, ids_log: str | None) -> WorkerPlan:
        return WorkerPlan(cfg=self.cfg, data=self.data, num_classes=self.num_classes, epochs=self.epochs,
                          windows_per_epoch=self.windows_per_epoch, tracking_uri=self.tracking_uri,
                          mlflow_run_id=self.mlflow_run_id, board=board, data_stats=data_stats, ids_log=ids_log)


def prepare(cfg: RunConfig, *, resume: str | None = None) -> RunPlan:
    """Check and plan a run (see the module doc); `resume` names a stopped run to continue."""
    check_backbone(cfg.model)
    other_eval = plan_eval_data(cfg)
    whole = plan_whole(cfg.data.source)
    data = with_split(whole, cfg.data.split)
    if data.rows < cfg.data.batch_size:
        raise UserError(f"data.source {cfg.data.source!r} split {cfg.data.split!r} has {data.rows} images, "
                        f"fewer than data.batch_size = {cfg.data.batch_size}")
    storage = absolute_storage(cfg.train.storage_path)
    name = resume or cfg.train.name or time.strftime("lejepa-%Y%m%d-%H%M%S")
    if resume:
        record = read_run_record(storage, name)
        tracking_uri, run_id = recorded_tracking_uri(record["tracking_uri"], cfg.track.uri), record["mlflow_run_id"]
    elif run_exists(storage, name):
        raise UserError(f"a run named {name!r} already exists under {storage}; use --resume {name} or another train.name")
    else:
        tracking_uri, run_id = resolve_tracking_uri(cfg.track.uri), None
    evaluation = (other_eval or EvalPlan.of(whole)) if cfg.eval.enabled else None
    return RunPlan(cfg=cfg, data=data, evaluation=evaluation, num_classes=len(whole.class_names),
                   epochs=epochs_needed(cfg, data), windows_per_epoch=windows_per_epoch(data, cfg.data), name=name,
                   storage=storage, resumed=bool(resume), tracking_uri=tracking_uri, mlflow_run_id=run_id)


def epochs_needed(cfg: RunConfig, plan: Plan) -> int:
    """Whole epochs the ranks' streams must cover: the run's images, plus a shuffle window per rank
    (ranks take whole windows, so one may run a window ahead of another), plus one epoch of margin."""
    images = cfg.train.steps * cfg.data.batch_size
    slack = cfg.train.workers * window_units(cfg.data) * UNIT_ROWS
    return math.ceil((images + slack) / plan.rows) + 1
