"""Offline linear probe on frozen features: the standard number for a self-supervised encoder.

Features are standardised with the training set's statistics, then one Linear layer is trained
with AdamW (weight decay 1e-6), linear warmup then cosine decay to lr / 1000 (the pretraining
schedule's shape). The weights start at zero and mini-batches come from a private generator, so
the result is a pure function of the inputs and `seed` (the global RNG is never touched).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lejepa_platform.eval.checks import check_labelled_split, num_classes_of

WARMUP_FRACTION = 0.1
"""Share of the optimizer steps spent in linear warmup."""


def linear_probe_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                          test_labels: torch.Tensor, *, epochs: int = 100, lr: float = 1e-3,
                          weight_decay: float = 1e-6, batch_size: int = 256, seed: int = 0) -> float:
    """Top-1 test accuracy of a linear classifier trained on the (frozen) training features."""
    check_labelled_split(train_feats, train_labels, test_feats, test_labels)
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"linear probe needs epochs >= 1, batch_size >= 1, lr > 0; "
                         f"got {epochs}, {batch_size}, {lr}")
    device = train_feats.device
    classes = num_classes_of(train_labels, test_labels)
    mean = train_feats.float().mean(dim=0)
    std = train_feats.float().std(dim=0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant dims: centre only
    x_train = (train_feats.float() - mean) / std
    x_test = (test_feats.float().to(device) - mean) / std
    y_train = train_labels.to(device)

    weight = torch.zeros(classes, x_train.shape[1], device=device, requires_grad=True)
    bias = torch.zeros(classes, device=device, requires_grad=True)
    optimizer = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=weight_decay, fused=True)
    steps_per_epoch = math.ceil(x_train.shape[0] / batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, int(WARMUP_FRACTION * total))
    generator = torch.Generator().manual_seed(seed)
    step = 0
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(x_train.shape[0], generator=generator).to(device)
            for start in range(0, x_train.shape[0], batch_size):
                for group in optimizer.param_groups:
                    group["lr"] = lr * _schedule(step, warmup, total)
                rows = order[start:start + batch_size]
                loss = F.cross_entropy(F.linear(x_train[rows], weight, bias), y_train[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
    with torch.no_grad():
        pred = F.linear(x_test, weight, bias).argmax(dim=1).cpu()
    return int((pred == test_labels.cpu()).sum()) / pred.shape[0]


def _schedule(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1, then cosine to 1/1000 at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 1e-3 + (1.0 - 1e-3) * 0.5 * (1.0 + math.cos(math.pi * progress))
