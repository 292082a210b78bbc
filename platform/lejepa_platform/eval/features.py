"""Frozen features: uint8 images -> normalised batches -> backbone embeddings, in-process.

Images are normalised exactly as in pretraining (`data.views.normalize`) so the frozen backbone
sees the input distribution it was trained on. Modules run in eval mode without gradients and get
their previous mode back afterwards. Results come back on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

Embedder = Callable[[torch.Tensor], torch.Tensor]


def extract_features(encoder_or_fn: nn.Module | Embedder, images_uint8: np.ndarray | torch.Tensor, *,
                     batch_size: int = 256, device: str | torch.device = "cpu") -> torch.Tensor:
    """(N, 3, S, S) uint8 images -> (N, E) float32 features.

    `encoder_or_fn` is an `Encoder` (its `embed` is used), any module, or a function from a
    normalised float batch (B, 3, S, S) to (B, E), e.g. `lambda x: x.flatten(1)` for raw pixels.
    """
    images = torch.as_tensor(images_uint8)
    embed = getattr(encoder_or_fn, "embed", encoder_or_fn)
    return _batched(embed, encoder_or_fn, images, batch_size, device, lambda out: out)


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
