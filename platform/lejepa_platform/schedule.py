"""The one learning-rate shape of the platform: linear warmup, then cosine decay to a floor.

Pretraining (`train/step.py`) and the offline linear probe (`eval/linear.py`) both use it, so
"the pretraining schedule's shape" in the probe is this function, not a second copy of it.
"""

from __future__ import annotations

import math

FLOOR = 1e-3
"""The factor at the last step: the learning rate ends at a thousandth of its peak."""


def warmup_cosine(position: float, warmup: int, total: int, floor: float = FLOOR) -> float:
    """Factor on the peak learning rate at `position` (a step, or a point between steps) of a
    `total`-step schedule: (position + 1) / warmup during the first `warmup` steps, then cosine
    from 1 down to `floor` at step `total`, and `floor` after it."""
    if position < warmup:
        return (position + 1) / warmup
    progress = min((position - warmup) / max(total - warmup, 1), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
