"""The FLOP count of one training image: what scaling fits put on their compute axis and `bench mfu`
divides by. It lives with the model because it is a property of the architecture and the views."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from lejepa_platform.config import RunConfig
from lejepa_platform.model.encoder import build_encoder, use_plain_attention


def training_flops_per_image(cfg: RunConfig) -> float:
    """Forward FLOPs of all views of one image (counted by torch), times 3 for forward + backward.

    Attention is counted through the plain matmul path: torch's FLOP counter has no formula for the
    fused CPU attention kernel and would leave the T^2 terms out.
    """
    encoder = build_encoder(cfg.model).eval()
    use_plain_attention(encoder)
    d = cfg.data
    global_views = torch.zeros(1, d.global_views, 3, d.global_size, d.global_size)
    local_views = torch.zeros(1, d.local_views, 3, d.local_size, d.local_size) if d.local_views else None
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        encoder(global_views, local_views)
    return 3.0 * counter.get_total_flops()
