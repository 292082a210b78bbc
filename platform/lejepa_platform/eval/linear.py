"""Offline linear probe on frozen features: the standard number for a self-supervised encoder.

Features are standardised with the training set's statistics, then one Linear layer is trained
with AdamW (weight decay 1e-6), linear warmup then cosine decay to lr / 1000 (the pretraining
schedule's shape). The learning rate is chosen per feature set: one fixed rate under-trains some
features and suits others (measured on the embedded dataset: a 96-dim ViT embedding gained 6
points going from 1e-3 to 3e-2, raw pixels lost 4), which would bias every comparison. Each rate
of a grid trains on 90 % of the training rows and is scored on the other 10 %; the best one is
retrained on all of them and scored on the test set. The grid trains as one batched model (one
weight matrix per rate, losses summed: AdamW keeps them independent), one pass for the whole
grid (evaluating three feature sets of the embedded dataset went from about 20 s to about 40 s). Weights start at zero and mini-batches come from a private generator, so the
result is a pure function of the inputs and `seed` (the global RNG is never touched).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lejepa_platform.eval.checks import check_labelled_split, num_classes_of

LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
"""The grid searched by default (a tie goes to the earlier rate: the smaller one here)."""
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
    """One (weight, bias) per learning rate, stacked: (R, C, E), (R, C)."""
    weights = [torch.zeros(classes, x.shape[1], device=x.device, requires_grad=True) for _ in lrs]
    biases = [torch.zeros(classes, device=x.device, requires_grad=True) for _ in lrs]
    optimizer = torch.optim.AdamW([{"params": [w, b], "lr": lr, "base_lr": lr} for w, b, lr in zip(weights, biases, lrs)],
                                  weight_decay=weight_decay, foreach=True)
    steps_per_epoch = math.ceil(x.shape[0] / batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, int(WARMUP_FRACTION * total))
    generator = torch.Generator().manual_seed(seed)
    step = 0
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(x.shape[0], generator=generator).to(x.device)
            for start in range(0, x.shape[0], batch_size):
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * _schedule(step, warmup, total)
                rows = order[start:start + batch_size]
                logits = torch.einsum("ne,rce->rnc", x[rows], torch.stack(weights)) + torch.stack(biases)[:, None]
                target = y[rows].repeat(len(lrs))
                loss = F.cross_entropy(logits.flatten(0, 1), target, reduction="sum") / rows.numel()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
    return torch.stack(weights).detach(), torch.stack(biases).detach()


def _accuracies(params: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Accuracy of each stacked classifier on (x, y): (R,)."""
    weight, bias = params
    with torch.no_grad():
        pred = (torch.einsum("ne,rce->rnc", x, weight) + bias[:, None]).argmax(dim=2)
    return (pred == y).sum(dim=1).cpu().double() / y.numel()


def _schedule(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1, then cosine to 1/1000 at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 1e-3 + (1.0 - 1e-3) * 0.5 * (1.0 + math.cos(math.pi * progress))
