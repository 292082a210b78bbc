"""One LeJEPA optimizer step, independent of Ray: the worker loop, the DDP-equivalence test and
`lejepa bench step` all call exactly this code.

The model is one module (`Pretrainer`: encoder + online probe) so that a single DDP wrapper keeps
both in sync across ranks. The probe reads DETACHED backbone embeddings: it never shapes the
encoder, and its accuracy is the optimistic online number, not an offline probe.
"""

from __future__ import annotations

import torch
from torch import nn

from lejepa_platform.config import RunConfig, warmup_steps
from lejepa_platform.data.views import augment_views, normalize
from lejepa_platform.distributed import any_rank
from lejepa_platform.eval.geometry import effective_rank
from lejepa_platform.loss import lejepa_loss, slice_directions
from lejepa_platform.model import build_encoder, use_plain_attention
from lejepa_platform.schedule import warmup_cosine


VIEW_KEYS = ("global", "local", "global_params", "local_params")
"""Batch columns that go to the device: uint8 views and, with device augmentation, their photometric numbers."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf: the step is not applied and no checkpoint is written after it."""


class FiniteCheck:
    """The first optimizer step whose loss was not finite, and its loss terms, kept on the device:
    `train_step` records into it without a host-device synchronisation, the caller reads it with
    `raise_if_nonfinite` (one synchronisation) on the steps it logs and checkpoints at."""

    def __init__(self, device: torch.device) -> None:
        self._first = torch.full((), -1, dtype=torch.int64, device=device)
        self._terms: dict[str, torch.Tensor] = {}

    def record(self, step: int, finite: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        first_bad = (~finite) & (self._first < 0)
        self._first = torch.where(first_bad, step, self._first)
        for key, value in terms.items():
            kept = self._terms.get(key, value)
            self._terms[key] = torch.where(first_bad, value, kept)

    def raise_if_nonfinite(self) -> None:
        first = int(self._first)
        if first >= 0:
            values = ", ".join(f"{k}={float(v):.4g}" for k, v in self._terms.items())
            raise NonFiniteLossError(f"non-finite loss at step {first}: {values}")


class Pretrainer(nn.Module):
    """Encoder plus an optional online linear probe (LayerNorm + Linear) on detached embeddings.

    `device` is where it will train (the caller moves it there): on CPU, attention takes the plain
    path (`model.use_plain_attention`), which is faster there. train.compile compiles the encoder.
    """

    def __init__(self, cfg: RunConfig, num_classes: int, *, device: torch.device | str = "cpu"):
        super().__init__()
        self.encoder = build_encoder(cfg.model)
        if torch.device(device).type == "cpu":
            use_plain_attention(self.encoder)
        if cfg.train.compile:
            self.encoder.compile()  # in place: the state dict keeps its keys
        self.probe = (nn.Sequential(nn.LayerNorm(self.encoder.embed_dim), nn.Linear(self.encoder.embed_dim, num_classes))
                      if cfg.train.probe and num_classes > 0 else None)

    def forward(self, global_views: torch.Tensor, local_views: torch.Tensor | None):
        out = self.encoder(global_views, local_views)
        logits = None
        if self.probe is not None:
            g = global_views.shape[1]
            logits = self.probe(out.embeddings[:g].detach().float().flatten(0, 1))
        return out, logits


def make_optimizer(model: Pretrainer, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW; the probe gets its own learning rate and no weight decay. The fused implementation
    skips an update on the device when told the loss was not finite (`found_inf`), so no step
    has to read the loss back to decide."""
    groups = [{"params": list(model.encoder.parameters()), "lr": cfg.train.lr,
               "weight_decay": cfg.train.weight_decay, "base_lr": cfg.train.lr}]
    if model.probe is not None:
        groups.append({"params": list(model.probe.parameters()), "lr": cfg.train.probe_lr,
                       "weight_decay": 0.0, "base_lr": cfg.train.probe_lr})
    return torch.optim.AdamW(groups, fused=True)


def lr_factor(position: float, cfg: RunConfig) -> float:
    """Linear warmup to 1, then cosine down to 1/1000 at the last step; `position` is the step on
    that schedule (the optimizer step itself, or further along under a time budget)."""
    return warmup_cosine(position, warmup_steps(cfg), cfg.train.steps)


def schedule_position(step: int, cfg: RunConfig, trained_s: float, step_s: float) -> tuple[float, bool]:
    """(position on the schedule, whether it is the run's last step) for optimizer step `step`,
    after `trained_s` seconds of training with recent steps taking `step_s` each.

    Without a time budget the position is the step and the last step is `steps - 1`. With one, time
    moves the position too: `trained_s / budget` of the way to the last step, so a slower machine
    runs fewer steps through the same whole schedule; the step expected to end at or past the
    budget is the last and gets the last step's learning rate.
    """
    last = cfg.train.steps - 1
    if step >= last:
        return float(last), True
    budget = cfg.train.time_budget_s
    if budget <= 0:
        return float(step), False
    if trained_s + step_s >= budget:
        return float(last), True
    return max(float(step), last * trained_s / budget), False


def autocast_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype | None:
    """bf16 on GPU (or when asked), none (float32) on CPU by default."""
    if cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], *,
               cfg: RunConfig, step: int, device: torch.device, diagnostics: bool = False,
               position: float | None = None, finite: FiniteCheck | None = None) -> dict[str, torch.Tensor]:
    """Forward, LeJEPA loss (+ probe loss), backward and AdamW update for optimizer step `step`.

    The learning rate is the schedule's at `position` (default: `step`; see `schedule_position`);
    SIGReg's slice directions always follow `step`. `model` is a `Pretrainer`, possibly DDP-wrapped.
    Nothing here waits for the device: a loss that is not finite skips the update on the device
    and is recorded in `finite`, which the caller reads when it logs; without one, the step reads
    it at once and raises NonFiniteLossError. Returns detached scalar tensors for logging;
    `diagnostics` adds the effective rank of the batch's embeddings (an SVD: only on logging steps).
    """
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr_factor(step if position is None else position, cfg)
    views = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k in VIEW_KEYS}
    if "global_params" in views:  # data.augment_on = device: the photometric half of the views runs here
        views = augment_views(views, cfg.data)
    global_views = normalize(views["global"])
    local = views.get("local")
    local_views = normalize(local) if local is not None and local.shape[1] else None
    g = global_views.shape[1]

    dtype = autocast_dtype(cfg, device)
    with torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out, logits = model(global_views, local_views)
    directions = slice_directions(out.projections.shape[-1], cfg.loss.num_slices, seed=cfg.train.seed,
                                  step=step, device=device)
    proj = out.projections.float()
    terms = lejepa_loss(proj[:g], proj[g:] if proj.shape[0] > g else None, directions,
                        lam=cfg.loss.lam, knots=cfg.loss.knots, t_max=cfg.loss.t_max, check_finite=False)
    objective = terms.total
    metrics = {"loss/total": terms.total.detach(), "loss/prediction": terms.prediction.detach(),
               "loss/sigreg": terms.sigreg.detach()}
    for v, value in enumerate(terms.sigreg_per_view.detach()):
        metrics[f"sigreg/view{v}"] = value
    labels = batch.get("label")
    if logits is not None and labels is not None:
        probe_loss, probe_acc = _probe_terms(logits, labels.to(device, non_blocking=True).long().repeat(g))
        objective = objective + probe_loss
        metrics["probe/loss"], metrics["probe/online_acc"] = probe_loss.detach(), probe_acc

    check = finite or FiniteCheck(device)
    not_finite = any_rank(~torch.isfinite(objective.detach()))  # every rank skips the same steps
    check.record(step, ~not_finite, {k: metrics[k] for k in ("loss/total", "loss/prediction", "loss/sigreg")})
    optimizer.zero_grad(set_to_none=True)
    objective.backward()
    optimizer.found_inf = not_finite.float().reshape(())  # read by the fused AdamW: no update when set
    optimizer.step()
    if finite is None:
        check.raise_if_nonfinite()
    metrics["embed/std"] = out.embeddings[:g].detach().float().std(dim=1).mean()
    metrics["proj/std"] = proj[:g].detach().std(dim=1).mean()
    if diagnostics:
        metrics["embed/effective_rank"] = torch.tensor(effective_rank(out.embeddings[:g].detach().float().flatten(0, 1)),
                                                       device=device)
    return metrics


def _probe_terms(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and accuracy of the online probe over the labelled rows (label >= 0), without
    reading the labels back: a batch without any labelled row gives zero loss and zero accuracy."""
    labelled = (targets >= 0).float()
    count = labelled.sum().clamp(min=1.0)
    losses = nn.functional.cross_entropy(logits, targets.clamp(min=0), reduction="none")
    correct = (logits.detach().argmax(1) == targets).float()
    return (losses * labelled).sum() / count, (correct * labelled).sum() / count
