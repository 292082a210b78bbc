"""Small labelled evaluation sets loaded in-process (no Ray): centre-cropped uint8 images + labels.

For sets that fit in memory (the embedded dataset, probes on a few thousand images); larger ones go
through `pipeline.eval_dataset`. Both use the same reader, so their pixels agree.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter

import numpy as np

from lejepa_platform.config import DataConfig
from lejepa_platform.data.reader import describe, eval_blocks, plan_source

log = logging.getLogger("lejepa_platform.data")


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """images: uint8 (N, 3, S, S); labels: int64 (N,), -1 when unlabelled; skipped: unreadable records."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    skipped: int = 0


def load_eval_set(source: str, split: str, size: int, *,
                  max_image_pixels: int = DataConfig().max_image_pixels) -> EvalSet:
    """Every record of `split`, shorter side resized to `size` then centre-cropped (stored order)."""
    plan = plan_source(source, split)
    images, labels = [], []
    counts: Counter = Counter()
    for unit in plan.units:
        for block, bad, records in eval_blocks(unit, plan, size, max_image_pixels):
            counts.update(bad)
            counts["records"] += records
            if block is not None:
                images.append(block["image"])
                labels.append(block["label"])
    skipped = counts["records"] - sum(len(x) for x in labels)
    if skipped:
        log.warning("eval set %s (%s): %s", source, split, describe(counts))
    stacked = np.concatenate(images) if images else np.zeros((0, 3, size, size), np.uint8)
    return EvalSet(stacked, np.concatenate(labels) if labels else np.zeros(0, np.int64), plan.class_names, skipped)
