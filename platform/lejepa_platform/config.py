"""Run configuration as frozen dataclasses: the schema.

A recipe builds a `RunConfig`; `--set section.field=value` derives a new one (never mutation)
through `overrides.py`, which also turns stored dicts back into configs. Every section validates
itself in `__post_init__` and raises `ConfigError` naming the field and what is allowed, so bad
input fails before any worker starts. Derived values (per-worker batch, warmup steps) are
functions here, logged, never written back.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

from lejepa_platform.errors import ConfigError
from lejepa_platform.overrides import check_key

AUGMENT_ON = ("auto", "data", "device")
"""Where photometric view augmentation may run (DataConfig.augment_on)."""
EVAL_FEATURES = ("embedding", "embedding+patch_mean")
"""What frozen-feature probes can read (eval/features.py)."""


def _require(ok: bool, field: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{field} = {value!r} is not allowed: must be {allowed}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Encoder: a timm backbone (random init) followed by a projector MLP."""

    backbone: str = "vit_tiny_patch16_224"
    """timm model name, created with pretrained=False and num_classes=0."""
    backbone_kwargs: dict = dataclasses.field(default_factory=dict)
    """Extra timm.create_model keyword arguments, e.g. {"patch_size": 8, "embed_dim": 96}."""
    proj_hidden_dim: int = 2048
    """Width of the projector's hidden layers."""
    proj_layers: int = 3
    """Number of linear layers in the projector (>= 1)."""
    proj_dim: int = 64
    """Output dimension of the projector: what SIGReg and the prediction term see."""
    proj_norm: str = "batchnorm"
    """Normalisation between projector layers: batchnorm (statistics over the global batch), layernorm or none."""

    def __post_init__(self) -> None:
        _require(bool(self.backbone), "model.backbone", "a timm model name", self.backbone)
        _require(self.proj_hidden_dim >= 1, "model.proj_hidden_dim", ">= 1", self.proj_hidden_dim)
        _require(self.proj_layers >= 1, "model.proj_layers", ">= 1", self.proj_layers)
        _require(self.proj_dim >= 1, "model.proj_dim", ">= 1", self.proj_dim)
        _require(self.proj_norm in ("batchnorm", "layernorm", "none"), "model.proj_norm",
                 "one of batchnorm, layernorm, none", self.proj_norm)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The LeJEPA objective: (1 - lam) * prediction + lam * SIGReg."""

    lam: float = 0.05
    """Weight of SIGReg, strictly between 0 and 1 (paper: 0.05; minimal example: 0.02)."""
    num_slices: int = 1024
    """Random directions per step for the sliced Epps-Pulley test."""
    knots: int = 17
    """Quadrature knots on [0, t_max]; odd."""
    t_max: float = 3.0
    """Upper end of the integration range of the characteristic function."""

    def __post_init__(self) -> None:
        _require(0.0 < self.lam < 1.0, "loss.lam", "in the open interval (0, 1)", self.lam)
        _require(self.num_slices >= 1, "loss.num_slices", ">= 1", self.num_slices)
        _require(self.knots >= 3 and self.knots % 2 == 1, "loss.knots", "an odd integer >= 3", self.knots)
        _require(self.t_max > 0 and math.isfinite(self.t_max), "loss.t_max", "a finite number > 0", self.t_max)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Image shards and the multi-crop views built from them by the data side."""

    source: str = "builtin:fashion-mnist-10k"
    """A shard directory (from `lejepa shards build`), an image folder, a WebDataset tar / folder of tars, or builtin:NAME."""
    split: str = "train"
    """Which part of the source to read: train, test (from the shard manifest's fixed split) or all."""
    global_views: int = 2
    """Number of global views per image (G)."""
    global_size: int = 224
    """Side in pixels of global views."""
    global_scale: tuple[float, float] = (0.3, 1.0)
    """RandomResizedCrop area range for global views."""
    local_views: int = 6
    """Number of local views per image (L); 0 for global views only."""
    local_size: int = 96
    """Side in pixels of local views."""
    local_scale: tuple[float, float] = (0.05, 0.3)
    """RandomResizedCrop area range for local views."""
    flip_p: float = 0.5
    """Probability of a horizontal flip."""
    jitter_p: float = 0.8
    """Probability of colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1)."""
    grayscale_p: float = 0.2
    """Probability of converting a view to grey."""
    blur_p: float = 0.5
    """Probability of a Gaussian blur."""
    solarize_p: float = 0.2
    """Probability of solarizing (threshold 128)."""
    batch_size: int = 256
    """Global batch size: images per optimizer step summed over all workers."""
    shuffle_buffer: int = 256
    """Rows shuffled together, a pure function of (seed, epoch): each epoch permutes the source's units
    (a few hundred rows each), reads consecutive units holding at least this many rows as one window
    and permutes its rows. Memory: the window's encoded images, in each process building its views."""
    prefetch_batches: int = 8
    """Batches of views each rank's data tasks build ahead of its trainer: the data side works at the
    trainer's pace instead of spending CPU and object store on views a time-budgeted run never uses,
    and up to this many batches are built in parallel on the CPUs the trainers leave free."""
    augment_on: str = "auto"
    """Where the photometric half of the views (flip, colour jitter, grayscale, blur, solarize) runs:
    "data" (the data tasks, on CPU), "device" (the trainer, after the host-to-device copy; the data
    side only decodes and crops) or "auto" ("device" when train.use_gpu, else "data"). Both give the
    same views for the same (seed, epoch, record id)."""
    max_image_pixels: int = 50_000_000
    """Images whose header claims more pixels are skipped as decompression bombs."""

    def __post_init__(self) -> None:
        _require(bool(self.source), "data.source", "a path or builtin:NAME", self.source)
        _require(self.split in ("train", "test", "all"), "data.split", "one of train, test, all", self.split)
        _require(self.global_views >= 1, "data.global_views", ">= 1", self.global_views)
        _require(self.local_views >= 0, "data.local_views", ">= 0", self.local_views)
        _require(self.global_size >= 8, "data.global_size", ">= 8 pixels", self.global_size)
        _require(self.local_size >= 8, "data.local_size", ">= 8 pixels", self.local_size)
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            _require(0.0 < lo <= hi <= 1.0, f"data.{name}", "(lo, hi) with 0 < lo <= hi <= 1", (lo, hi))
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            _require(0.0 <= p <= 1.0, f"data.{name}", "a probability in [0, 1]", p)
        _require(self.batch_size >= 2, "data.batch_size", ">= 2", self.batch_size)
        _require(self.shuffle_buffer >= 0, "data.shuffle_buffer", ">= 0", self.shuffle_buffer)
        _require(self.prefetch_batches >= 1, "data.prefetch_batches", ">= 1", self.prefetch_batches)
        _require(self.augment_on in AUGMENT_ON, "data.augment_on", f"one of {', '.join(AUGMENT_ON)}", self.augment_on)
        _require(self.max_image_pixels >= 1, "data.max_image_pixels", ">= 1", self.max_image_pixels)

    @property
    def num_views(self) -> int:
        return self.global_views + self.local_views


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, scale-out and fault tolerance of one pretraining run."""

    steps: int = 1000
    """Total optimizer steps of the run (with a time budget: at most this many)."""
    lr: float = 5e-4
    """Peak learning rate of AdamW (reached after warmup)."""
    weight_decay: float = 0.05
    """AdamW weight decay (paper: 5e-2 for ViTs, 5e-4 for ResNets)."""
    warmup_frac: float = 0.1
    """Fraction of the steps spent in linear warmup before the cosine decay to lr / 1000."""
    time_budget_s: float = 0.0
    """Training-time budget in seconds; 0 means none (the run takes exactly `steps` steps). With one,
    the schedule advances by whichever is further along, steps / `steps` or training time / budget,
    and the run ends when either reaches its end. Training time is the worker loop's wall time from
    its first batch, summed over restarts: start-up, restarts and evaluation are outside it."""
    workers: int = 1
    """Ray Train workers (data-parallel ranks)."""
    use_gpu: bool = False
    """One GPU per worker, bf16 autocast."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker; leave some for the data tasks on small machines."""
    torch_threads: int = 0
    """torch intra-op threads per worker; 0 means the worker's CPU reservation, rounded up."""
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), bf16 or fp32."""
    compile: bool = False
    """Compile the encoder with torch.compile (CPU needs a C compiler; the first steps pay for it)."""
    log_every: int = 10
    """Steps between metric reports."""
    checkpoint_every: int = 100
    """Steps between checkpoints (the last step always checkpoints)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on storage (most recent)."""
    max_failures: int = 2
    """Worker-group restarts from the latest checkpoint before the run fails."""
    seed: int = 0
    """Seeds the model init, the views and the SIGReg directions."""
    probe: bool = True
    """Train an online linear probe on detached backbone embeddings when labels exist."""
    probe_lr: float = 1e-3
    """Learning rate of the online probe."""
    storage_path: str = "lejepa-runs"
    """Where checkpoints go: a local directory, shared file system or object store URI."""
    name: str = ""
    """Run name under storage_path; empty picks a fresh timestamped one."""

    def __post_init__(self) -> None:
        _require(self.steps >= 1, "train.steps", ">= 1", self.steps)
        _require(self.lr > 0, "train.lr", "> 0", self.lr)
        _require(self.weight_decay >= 0, "train.weight_decay", ">= 0", self.weight_decay)
        _require(0.0 <= self.warmup_frac < 1.0, "train.warmup_frac", "in [0, 1)", self.warmup_frac)
        _require(self.time_budget_s >= 0, "train.time_budget_s", ">= 0 (0: no budget)", self.time_budget_s)
        _require(self.workers >= 1, "train.workers", ">= 1", self.workers)
        _require(self.cpus_per_worker > 0, "train.cpus_per_worker", "> 0", self.cpus_per_worker)
        _require(self.torch_threads >= 0, "train.torch_threads", ">= 0", self.torch_threads)
        _require(self.precision in ("auto", "bf16", "fp32"), "train.precision",
                 "one of auto, bf16, fp32", self.precision)
        _require(self.log_every >= 1, "train.log_every", ">= 1", self.log_every)
        _require(self.checkpoint_every >= 1, "train.checkpoint_every", ">= 1", self.checkpoint_every)
        _require(self.keep_checkpoints >= 1, "train.keep_checkpoints", ">= 1", self.keep_checkpoints)
        _require(self.max_failures >= 0, "train.max_failures", ">= 0", self.max_failures)
        _require(self.probe_lr > 0, "train.probe_lr", "> 0", self.probe_lr)
        _require(bool(self.storage_path), "train.storage_path", "a directory or URI", self.storage_path)


@dataclasses.dataclass(frozen=True)
class TrackConfig:
    """Where runs are recorded."""

    uri: str = ""
    """MLflow tracking URI; empty means MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db."""
    experiment: str = "lejepa"
    """MLflow experiment name."""
    run_name: str = ""
    """MLflow run name; empty uses the train run name."""
    wait_s: float = 120.0
    """How long the driver waits at the end of a run for a tracking server that does not answer (one
    restarting comes back within it) before it stops with the command that records the run later."""

    def __post_init__(self) -> None:
        _require(self.wait_s >= 0, "track.wait_s", ">= 0", self.wait_s)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation run after pretraining: frozen-feature probes when the data has labels, the
    label-free geometry (SIGReg, RankMe, spectrum) of pretrained vs random init always."""

    enabled: bool = True
    """Evaluate the final backbone (and the same backbone at random init) after pretraining."""
    protocols: tuple[str, ...] = ("linear", "knn")
    """Protocols to run: any of linear, knn, fewshot."""
    eval_size: int = 0
    """Side in pixels of evaluation images; 0 means data.global_size."""
    data: str = ""
    """Labelled source the end-of-run evaluation probes on (any source the platform reads); empty
    means data.source. Its manifest's split is used, or a seeded one when it has none."""
    features: str = "embedding+patch_mean"
    """What the probes read: "embedding" (the backbone's pooled output) or "embedding+patch_mean"
    (ViTs: that and the mean patch token, concatenated; other backbones: the embedding).
    eval/features.py says why."""

    def __post_init__(self) -> None:
        allowed = ("linear", "knn", "fewshot")
        bad = [p for p in self.protocols if p not in allowed]
        _require(not bad and len(self.protocols) > 0, "eval.protocols",
                 f"a non-empty list drawn from {', '.join(allowed)}", self.protocols)
        _require(self.eval_size >= 0, "eval.eval_size", ">= 0", self.eval_size)
        _require(self.features in EVAL_FEATURES, "eval.features", f"one of {', '.join(EVAL_FEATURES)}", self.features)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one pretraining run needs; what recipes in pipelines/ return."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    track: TrackConfig = dataclasses.field(default_factory=TrackConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _require(self.data.batch_size % self.train.workers == 0, "data.batch_size",
                 f"divisible by train.workers = {self.train.workers}", self.data.batch_size)
        _require(self.data.batch_size // self.train.workers >= 2, "data.batch_size",
                 f">= 2 images per worker (train.workers = {self.train.workers})", self.data.batch_size)


SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A Ray Tune sweep: a base run, a search space over config keys, a budget and a scheduler."""

    base: RunConfig = dataclasses.field(default_factory=RunConfig)
    """The run every trial starts from."""
    space: dict = dataclasses.field(default_factory=dict)
    """{"loss.num_slices": {"grid": [64, 256]}, "loss.lam": {"loguniform": [0.01, 0.1]}, ...}."""
    num_samples: int = 1
    """Samples of the random dimensions (each grid point is repeated num_samples times)."""
    scheduler: str = "fifo"
    """fifo (every trial runs its budget) or asha (stops poor trials early on `metric`)."""
    metric: str = "loss/total"
    """Reported metric the scheduler compares: label-free by default."""
    mode: str = "min"
    """min or max."""
    grace_reports: int = 2
    """ASHA: reports a trial always gets before it may be stopped."""
    reduction_factor: int = 2
    """ASHA: keep 1 / reduction_factor of the trials at each rung."""
    max_concurrent_trials: int = 0
    """0 derives it from the cluster's CPUs / GPUs and one trial's needs."""
    name: str = "sweep"
    """Sweep name: the Tune experiment under train.storage_path and the MLflow parent run's name."""

    def __post_init__(self) -> None:
        _require(isinstance(self.space, dict) and len(self.space) > 0, "sweep.space",
                 "a non-empty mapping of config keys to {kind: values}", self.space)
        for key, spec in self.space.items():
            check_key(RunConfig, key)
            ok = isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SEARCH_KINDS
            _require(ok, f"sweep.space[{key!r}]", f"one of {{kind: values}} with kind in {', '.join(SEARCH_KINDS)}", spec)
            kind, values = next(iter(spec.items()))
            if kind in ("grid", "choice"):
                _require(isinstance(values, (list, tuple)) and len(values) > 0, f"sweep.space[{key!r}].{kind}",
                         "a non-empty list", values)
            else:
                _require(isinstance(values, (list, tuple)) and len(values) == 2 and values[0] < values[1],
                         f"sweep.space[{key!r}].{kind}", "[low, high] with low < high", values)
        _require(self.num_samples >= 1, "sweep.num_samples", ">= 1", self.num_samples)
        _require(self.scheduler in ("fifo", "asha"), "sweep.scheduler", "fifo or asha", self.scheduler)
        _require(self.mode in ("min", "max"), "sweep.mode", "min or max", self.mode)
        _require(self.grace_reports >= 1, "sweep.grace_reports", ">= 1", self.grace_reports)
        _require(self.reduction_factor >= 2, "sweep.reduction_factor", ">= 2", self.reduction_factor)
        _require(self.max_concurrent_trials >= 0, "sweep.max_concurrent_trials", ">= 0", self.max_concurrent_trials)
        _require(bool(self.name), "sweep.name", "a non-empty name", self.name)


# --------------------------------------------------------------------------------------------
# Derived values: functions of the config, logged by the trainer, never stored back.


def per_worker_batch_size(cfg: RunConfig) -> int:
    """Images each worker takes per step."""
    return cfg.data.batch_size // cfg.train.workers


def augment_placement(cfg: RunConfig) -> str:
    """Where photometric augmentation runs for this run: "data" or "device" (data.augment_on resolved)."""
    if cfg.data.augment_on == "auto":
        return "device" if cfg.train.use_gpu else "data"
    return cfg.data.augment_on


def warmup_steps(cfg: RunConfig) -> int:
    """Linear-warmup length in optimizer steps."""
    return int(round(cfg.train.warmup_frac * cfg.train.steps))


# --------------------------------------------------------------------------------------------
# Plain dicts out (checkpoints, MLflow params); `overrides.from_dict` reads them back.


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON-ready nested dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def flatten(cfg: Any) -> dict[str, Any]:
    """{"loss.lam": 0.05, ...}: one entry per leaf of a config (or nested dict), e.g. for MLflow."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value and prefix.split(".")[-1] != "backbone_kwargs":
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else key, sub)
        else:
            out[prefix] = value

    walk("", dict(cfg) if isinstance(cfg, Mapping) else to_dict(cfg))
    return out
