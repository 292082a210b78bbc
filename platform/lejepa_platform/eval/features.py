"""Frozen features: uint8 images -> normalised batches -> backbone embeddings, in-process.

Images are normalised exactly as in pretraining (`data.views.normalize`) so the frozen backbone
sees the input distribution it was trained on. Modules run in eval mode without gradients and get
their previous mode back afterwards. Results come back on the CPU.

What the probes read (`FEATURES`, chosen by eval.features): "embedding" is the backbone's pooled
output (for timm ViTs the class token), the vector the online probe and the geometry read;
"embedding+patch_mean" appends the mean of the final patch tokens for ViTs (DINO's linear
evaluation of ViT-B reads the same pair), because the class token alone leaves out what the
patch tokens learnt (docs/performance.md compares both). Backbones without patch tokens (CNNs)
give their embedding either way. The embedding is always the first E columns.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from lejepa_platform.config import EVAL_FEATURES as FEATURES

Embedder = Callable[[torch.Tensor], torch.Tensor]


def extract_features(encoder_or_fn: nn.Module | Embedder, images_uint8: np.ndarray | torch.Tensor, *,
                     features: str = "embedding", batch_size: int = 256,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """(N, 3, S, S) uint8 images -> (N, D) float32 features.

    `encoder_or_fn` is an `Encoder` (read as `features` says), any module, or a function from a
    normalised float batch (B, 3, S, S) to (B, D), e.g. `lambda x: x.flatten(1)` for raw pixels.
    """
    images = torch.as_tensor(images_uint8)
    embed = probe_embedder(encoder_or_fn, features) if hasattr(encoder_or_fn, "embed") else encoder_or_fn
    return _batched(embed, encoder_or_fn, images, batch_size, device, lambda out: out)


def probe_embedder(encoder: nn.Module, features: str) -> Embedder:
    """The function of a normalised batch that yields `features` (one of FEATURES) of `encoder`."""
    if features not in FEATURES:
        raise ValueError(f"features must be one of {', '.join(FEATURES)}, got {features!r}")
    backbone = encoder.backbone
    if features == "embedding" or not is_vit(backbone):
        return encoder.embed

    def embedding_and_patch_mean(images: torch.Tensor) -> torch.Tensor:
        tokens = backbone.forward_features(images)
        patch_mean = tokens[:, backbone.num_prefix_tokens:].mean(dim=1)
        return torch.cat([backbone.forward_head(tokens), patch_mean], dim=1)

    return embedding_and_patch_mean


def vit_patch_features(encoder: nn.Module, images_uint8: np.ndarray | torch.Tensor, *,
                       device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """Per-image (H, W, E) patch-token features of a timm ViT backbone (prefix tokens dropped).

    Raises TypeError for backbones without patch tokens; `is_vit` says which ones have them.
    """
    backbone = getattr(encoder, "backbone", encoder)
    if not is_vit(backbone):
        raise TypeError(f"{type(backbone).__name__} has no patch tokens")
    images = torch.as_tensor(images_uint8)
    grid = backbone.patch_embed.dynamic_feat_size(tuple(images.shape[-2:]))
    prefix = backbone.num_prefix_tokens

    def unflatten(tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, prefix:].reshape(tokens.shape[0], grid[0], grid[1], -1)

    feats = _batched(backbone.forward_features, backbone, images, 256, device, unflatten)
    return list(feats.unbind(0))


def weights_digest(module: nn.Module) -> str:
    """sha256 of a module's state (names and bytes): which weights features were computed with, the
    same whether they were loaded from a checkpoint or a run's backbone artifact."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode() + b"\0")
        digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def is_vit(backbone: nn.Module) -> bool:
    """True for timm backbones that emit a grid of patch tokens (the VisionTransformer family)."""
    return hasattr(backbone, "patch_embed") and hasattr(backbone, "num_prefix_tokens")


def _batched(fn: Embedder, module_or_fn: object, images: torch.Tensor, batch_size: int,
             device: str | torch.device, post: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    from lejepa_platform.data.views import normalize

    if images.dim() != 4 or images.dtype != torch.uint8:
        raise ValueError(f"images must be a uint8 (N, C, H, W) array, got {images.dtype} {tuple(images.shape)}")
    was_training = module_or_fn.training if isinstance(module_or_fn, nn.Module) else None
    if was_training is not None:
        module_or_fn.eval()
    try:
        with torch.no_grad():
            chunks = [post(fn(normalize(images[i:i + batch_size].to(device)))).float().cpu()
                      for i in range(0, images.shape[0], batch_size)]
    finally:
        if was_training is not None:
            module_or_fn.train(was_training)
    return torch.cat(chunks)
