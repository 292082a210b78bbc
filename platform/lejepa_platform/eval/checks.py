"""Input checks shared by the labelled protocols: bad input becomes one clear UserError line."""

from __future__ import annotations

import torch

from lejepa_platform.errors import UserError


def check_labelled_split(train_feats: torch.Tensor, train_labels: torch.Tensor,
                         test_feats: torch.Tensor, test_labels: torch.Tensor) -> None:
    """2-D features of one width, one integer label >= 0 per row, on both sides."""
    for name, feats, labels in (("train", train_feats, train_labels), ("test", test_feats, test_labels)):
        if feats.dim() != 2 or feats.shape[0] == 0:
            raise UserError(f"{name} features must be a non-empty (N, E) matrix, got shape {tuple(feats.shape)}")
        if labels.shape != (feats.shape[0],):
            raise UserError(f"{name} labels must have shape ({feats.shape[0]},) to match the features, "
                            f"got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise UserError(f"{name} labels must be integers, got {labels.dtype}")
        unlabelled = int((labels < 0).sum())
        if unlabelled:
            raise UserError(f"this protocol needs labels, but {unlabelled} of {labels.numel()} {name} "
                            f"images are unlabelled (label -1)")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise UserError(f"feature dimension mismatch: train features have {train_feats.shape[1]} "
                        f"dimensions, test features {test_feats.shape[1]}")


def num_classes_of(*labels: torch.Tensor) -> int:
    """Classes implied by integer labels 0..C-1 (the largest label + 1)."""
    return int(max(int(lab.max()) for lab in labels)) + 1
