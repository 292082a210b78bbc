"""Few-shot evaluation: n labelled training images per class, several seeded draws.

Classifier: nearest class mean under cosine similarity (each class's prototype is the mean of its
L2-normalised shots). With 1-10 examples per class a trained probe mostly measures its own
regularisation and standardisation noise; the prototype rule has no hyperparameters, no training
and is exactly reproducible, so differences between encoders come from the features alone.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lejepa_platform.errors import UserError
from lejepa_platform.eval.checks import check_labelled_split


@torch.no_grad()
def fewshot_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                     test_labels: torch.Tensor, *, shots: Sequence[int] = (1, 10), draws: int = 5,
                     seed: int = 0) -> dict[int, dict[str, float | list[float]]]:
    """{shots: {"mean", "std", "accuracies"}} over `draws` draws of `shots` images per class.

    Draw d for a given shot count is a pure function of (seed, shots, d). Classes are those present
    in the training labels; std is the sample standard deviation over draws (0 for one draw).
    """
    check_labelled_split(train_feats, train_labels, test_feats, test_labels)
    if draws < 1 or not shots or min(shots) < 1:
        raise ValueError(f"few-shot needs draws >= 1 and shots >= 1, got draws={draws}, shots={shots}")
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float().to(train.device), dim=1)
    labels = train_labels.cpu().numpy()
    classes = np.unique(labels)
    members = [np.flatnonzero(labels == c) for c in classes]
    class_ids = torch.as_tensor(classes, device=train.device)
    truth = test_labels.to(train.device)
    smallest = min(range(len(classes)), key=lambda i: len(members[i]))
    results: dict[int, dict[str, float | list[float]]] = {}
    for n in shots:
        if len(members[smallest]) < n:
            raise UserError(f"{n}-shot evaluation needs >= {n} labelled training images per class; "
                            f"class {int(classes[smallest])} has {len(members[smallest])}")
        accuracies = []
        for draw in range(draws):
            rng = np.random.default_rng((seed, n, draw))
            picked = [rng.choice(rows, size=n, replace=False) for rows in members]
            index = torch.as_tensor(np.stack(picked), device=train.device)  # (C, n)
            prototypes = F.normalize(train[index].mean(dim=1), dim=1)
            pred = class_ids[(test @ prototypes.T).argmax(dim=1)]
            accuracies.append(int((pred == truth).sum()) / truth.shape[0])
        spread = statistics.stdev(accuracies) if draws > 1 else 0.0
        results[n] = {"mean": statistics.fmean(accuracies), "std": spread, "accuracies": accuracies}
    return results
