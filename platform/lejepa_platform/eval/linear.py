"""Offline linear probe on frozen features: the standard number for a self-supervised encoder.

Features are standardised with the training set's statistics, then one Linear layer is trained
with AdamW (weight decay 1e-6), linear warmup then cosine decay to lr / 1000 (the pretraining
schedule's shape). The learning rate is chosen per feature set: one fixed rate under-trains some
features and suits others (docs/performance.md), which would bias every comparison. Each rate
of a grid trains on 90 % of the training rows and is scored on the other 10 %; the best one is
retrained on all of them and scored on the test set. The grid trains as one batched model (one
weight matrix per rate, updated independently), one pass for the whole grid. Weights start at
zero and mini-batches come from a private generator, so the result is a pure function of the
inputs and `seed` (the global RNG is never touched).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from lejepa_platform.eval.checks import check_labelled_split, num_classes_of
from lejepa_platform.schedule import warmup_cosine

LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
"""The grid searched by default (a tie goes to the earlier rate: the smaller one here). Wide on
purpose: raw pixels and random-init features want rates far apart (docs/performance.md)."""
VALIDATION_FRACTION = 0.1
"""Share of the training rows held out to choose the learning rate."""
WARMUP_FRACTION = 0.1
"""Share of the optimizer steps spent in linear warmup."""


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    accuracy: float
    """Top-1 accuracy on the test features."""
    lr: float
    """The learning rate used (chosen on the validation rows when several were given)."""


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, *, lrs: Sequence[float] = LEARNING_RATES, epochs: int = 100,
                 weight_decay: float = 1e-6, batch_size: int = 256, seed: int = 0) -> ProbeResult:
    """Linear classifier on the (frozen) training features, scored on the test features."""
    check_labelled_split(train_feats, train_labels, test_feats, test_labels)
    if epochs < 1 or batch_size < 1 or not lrs or min(lrs) <= 0:
        raise ValueError(f"linear probe needs epochs >= 1, batch_size >= 1 and learning rates > 0; "
                         f"got {epochs}, {batch_size}, {list(lrs)}")
    device = train_feats.device
    classes = num_classes_of(train_labels, test_labels)
    mean = train_feats.float().mean(dim=0)
    std = train_feats.float().std(dim=0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant dims: centre only
    x_train = (train_feats.float() - mean) / std
    x_test = (test_feats.float().to(device) - mean) / std
    y_train = train_labels.to(device)
    settings = dict(classes=classes, epochs=epochs, weight_decay=weight_decay, batch_size=batch_size, seed=seed)

    lr = float(lrs[0])
    if len(lrs) > 1:
        order = torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(seed + 1)).to(device)
        held = max(1, int(VALIDATION_FRACTION * x_train.shape[0]))
        val, fit = order[:held], order[held:]
        scores = _accuracies(_train(x_train[fit], y_train[fit], [float(r) for r in lrs], **settings),
                             x_train[val], y_train[val])
        lr = float(lrs[int(torch.argmax(scores))])
    weights = _train(x_train, y_train, [lr], **settings)
    return ProbeResult(float(_accuracies(weights, x_test, test_labels.to(device))[0]), lr)


def _train(x: torch.Tensor, y: torch.Tensor, lrs: list[float], *, classes: int, epochs: int, weight_decay: float,
           batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One (weight, bias) per learning rate, stacked: (R, C, E), (R, C).

    Softmax regression with its gradient and AdamW written out (torch.optim.AdamW's update and
    defaults: betas 0.9 / 0.999, eps 1e-8, decoupled decay on weight and bias alike) over one
    (R, C, E + 1) tensor, the bias as its last column: the whole grid is two matrix products and
    a few element-wise ops per mini-batch, where autograd and a parameter group per rate spent
    most of the time on bookkeeping. A test checks it against nn.Linear + torch.optim.AdamW.
    """
    rows_total, dim = x.shape
    rates = torch.tensor(lrs, dtype=torch.float32, device=x.device)[:, None, None]
    inputs = torch.cat([x, torch.ones(rows_total, 1, dtype=x.dtype, device=x.device)], dim=1)
    params = torch.zeros(len(lrs), classes, dim + 1, device=x.device)
    exp_avg, exp_avg_sq = torch.zeros_like(params), torch.zeros_like(params)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    steps_per_epoch = math.ceil(rows_total / batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, int(WARMUP_FRACTION * total))
    generator = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(rows_total, generator=generator).to(x.device)
        for start in range(0, rows_total, batch_size):
            rows = order[start:start + batch_size]
            batch, target = inputs[rows], y[rows]
            logits = (batch @ params.flatten(0, 1).T).view(-1, len(lrs), classes)  # (n, R, C)
            grad_logits = torch.softmax(logits, dim=2)
            grad_logits[torch.arange(rows.numel(), device=x.device), :, target] -= 1.0
            grad = (grad_logits.flatten(1).T @ batch).view_as(params) / rows.numel()
            lr = rates * warmup_cosine(step, warmup, total)
            step += 1
            params.mul_(1.0 - lr * weight_decay)
            exp_avg.lerp_(grad, 1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            denom = (exp_avg_sq.sqrt() / math.sqrt(1.0 - beta2 ** step)).add_(eps)
            params.sub_(lr / (1.0 - beta1 ** step) * exp_avg / denom)
    return params[..., :dim].contiguous(), params[..., dim].contiguous()


def _accuracies(params: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Accuracy of each stacked classifier on (x, y): (R,)."""
    weight, bias = params
    with torch.no_grad():
        pred = (torch.einsum("ne,rce->rnc", x, weight) + bias[:, None]).argmax(dim=2)
    return (pred == y).sum(dim=1).cpu().double() / y.numel()
