"""Weighted k-nearest-neighbour classification on frozen features (DINO-style protocol).

Features are L2-normalised, so similarity is cosine; each of the k nearest training rows votes for
its label with weight exp(similarity / temperature). No training, no hyperparameter search: a
cheap, deterministic read-out of how well the embedding clusters classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lejepa_platform.eval.checks import check_labelled_split, num_classes_of

CHUNK_ROWS = 1024
"""Test rows scored at once: bounds the (rows, N_train) similarity matrix in memory."""


@torch.no_grad()
def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, *, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None) -> float:
    """Top-1 accuracy of temperature-weighted kNN votes; k is capped at the training set size."""
    check_labelled_split(train_feats, train_labels, test_feats, test_labels)
    if k < 1 or temperature <= 0:
        raise ValueError(f"knn needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    classes = num_classes or num_classes_of(train_labels, test_labels)
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    train_labels = train_labels.to(train.device)
    k = min(k, train.shape[0])
    correct = 0
    for start in range(0, test.shape[0], CHUNK_ROWS):
        sims, idx = (test[start:start + CHUNK_ROWS] @ train.T).topk(k, dim=1)
        votes = torch.zeros(sims.shape[0], classes, device=train.device)
        votes.scatter_add_(1, train_labels[idx], (sims / temperature).exp())
        pred = votes.argmax(dim=1).cpu()
        correct += int((pred == test_labels[start:start + CHUNK_ROWS].cpu()).sum())
    return correct / test.shape[0]
