"""Encoder: any timm backbone (random init, no classifier head) followed by the projector.

timm is the one backbone registry: a name it does not know fails early with close suggestions,
and keyword arguments it rejects fail naming the argument, both as UserError (one CLI line).
Multi-crop feeds two resolutions, so backbones that accept `dynamic_img_size` (timm's
VisionTransformer family) get it switched on; image-size-agnostic ones (CNNs) need nothing.
The architecture is fully determined by ModelConfig, so a checkpoint always reloads into
`build_encoder(cfg)`: put `img_size` in backbone_kwargs to size a ViT's position embedding.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import timm
import torch
from torch import nn

from lejepa_platform.config import ModelConfig
from lejepa_platform.errors import UserError
from lejepa_platform.model.projector import Projector

_AUTO_KWARGS = {"dynamic_img_size": True}
"""Passed to every backbone that accepts them, unless backbone_kwargs sets them."""


class EncoderOutput(NamedTuple):
    """Per-view outputs, views ordered globals first then locals."""

    embeddings: torch.Tensor
    """(V, B, E) backbone features: what probes read."""
    projections: torch.Tensor
    """(V, B, P) projector outputs: what SIGReg and the prediction term read."""


class Encoder(nn.Module):
    """Backbone + projector applied to multi-crop batches."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, embed_dim: int):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.embed_dim = embed_dim

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, E) backbone features."""
        return self.backbone(images)

    def forward(self, global_views: torch.Tensor, local_views: torch.Tensor | None = None) -> EncoderOutput:
        """(B, G, 3, Hg, Wg) and optional (B, L, 3, Hl, Wl) -> EncoderOutput with V = G + L views.

        One backbone call per resolution; the projector sees all V x B embeddings at once, so its
        batch norm statistics cover every view of the (global) batch.
        """
        batch = global_views.shape[0]
        groups = [global_views]
        if local_views is not None and local_views.shape[1] > 0:
            groups.append(local_views)
        embeddings = torch.cat([self._embed_views(views) for views in groups], dim=0)
        num_views = embeddings.shape[0] // batch
        projections = self.projector(embeddings)
        return EncoderOutput(embeddings.view(num_views, batch, -1), projections.view(num_views, batch, -1))

    def _embed_views(self, views: torch.Tensor) -> torch.Tensor:
        """(B, K, 3, H, W) -> (K * B, E), view-major so rows reshape to (K, B, E)."""
        return self.backbone(views.transpose(0, 1).flatten(0, 1))


def build_encoder(cfg: ModelConfig, *, optional_kwargs: Mapping[str, Any] | None = None) -> Encoder:
    """timm backbone `cfg.backbone` (pretrained=False, num_classes=0) + projector from `cfg`.

    `optional_kwargs` are passed to timm only when the backbone accepts them (the evaluation's
    random-init baseline uses it for zero_init_last=False); backbone_kwargs always win.
    """
    backbone = create_backbone(cfg.backbone, cfg.backbone_kwargs, optional_kwargs or {})
    embed_dim = int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)
    projector = Projector(embed_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers, cfg.proj_norm)
    return Encoder(backbone, projector, embed_dim)


def check_backbone(cfg: ModelConfig) -> None:
    """Build the encoder on the meta device (no memory, no init): fails fast, as a UserError, on a
    name timm does not know or keyword arguments it rejects, before any worker starts."""
    with torch.device("meta"):
        build_encoder(cfg)


def create_backbone(name: str, kwargs: Mapping[str, Any], optional: Mapping[str, Any]) -> nn.Module:
    """timm.create_model with user errors for unknown names and rejected keyword arguments."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean: {', '.join(close)}?" if close else "; see timm.list_models()"
        raise UserError(f"model.backbone = {name!r} is not a timm model{hint}")
    extra = {k: v for k, v in {**_AUTO_KWARGS, **optional}.items() if k not in kwargs}
    while True:
        try:
            return timm.create_model(name, pretrained=False, num_classes=0, **kwargs, **extra)
        except TypeError as err:
            rejected = _rejected_kwarg(str(err))
            if rejected in extra:
                del extra[rejected]
                continue
            if not kwargs:
                raise
            where = f"model.backbone_kwargs[{rejected!r}]" if rejected in kwargs else "model.backbone_kwargs"
            raise UserError(f"{where} rejected by timm model {name!r}: {err}") from None


def use_plain_attention(module: nn.Module) -> int:
    """Switch every timm attention block in `module` from fused scaled-dot-product attention to the
    plain softmax(QK^T)V path; returns how many blocks were switched. For CPU: there the fused
    kernel was never faster, and slower on the short sequences of small images (docs/performance.md).
    Both paths compute the same function; on GPU the fused kernel wins, so it stays there."""
    switched = 0
    for block in module.modules():
        if isinstance(getattr(block, "fused_attn", None), bool):
            block.fused_attn = False
            switched += 1
    return switched


def _rejected_kwarg(message: str) -> str | None:
    """The keyword named by a TypeError such as "__init__() got an unexpected keyword argument 'x'"."""
    match = re.search(r"keyword argument '(\w+)'", message)
    return match.group(1) if match else None
