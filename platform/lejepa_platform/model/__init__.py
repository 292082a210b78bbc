"""Encoder: timm backbone + projector. Pure torch + timm."""

from lejepa_platform.model.encoder import (Encoder, EncoderOutput, build_encoder, check_backbone, create_backbone,
                                           use_plain_attention)
from lejepa_platform.model.projector import GlobalBatchNorm1d, Projector

__all__ = ["Encoder", "EncoderOutput", "GlobalBatchNorm1d", "Projector", "build_encoder", "check_backbone", "create_backbone",
           "use_plain_attention"]
