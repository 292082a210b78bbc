"""Small evaluation sets loaded in-process (no Ray): centre-cropped uint8 images + labels.

For sets that fit in memory (the embedded dataset, probes on a few thousand images, a seeded
sample of a large unlabelled source: `max_rows`). It reads through the same reader as training,
so their pixels agree.

Splits: a source with its own fixed train/test split (a shard manifest's, Hub train-/test- files)
is evaluated on it; any other
source gets a seeded one here (SEEDED_TEST_FRACTION of each label value held out), so a labelled
probe set can be a plain image folder, a path list or Hub-layout Parquet.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import Counter

import numpy as np

from lejepa_platform.config import DataConfig
from lejepa_platform.console import warn
from lejepa_platform.data.reader import Plan, describe, eval_blocks, with_split
from lejepa_platform.data.sources import locate


SEEDED_TEST_FRACTION = 0.2
"""Share of each label value (unlabelled rows count as one value) held out by a seeded split."""


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """images: uint8 (N, 3, S, S); labels: int64 (N,), -1 when unlabelled; skipped: unreadable records."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    skipped: int = 0

    def subset(self, mask: np.ndarray) -> EvalSet:
        return EvalSet(self.images[mask], self.labels[mask], self.class_names, self.skipped)


@dataclasses.dataclass(frozen=True)
class EvalSplits:
    """What an evaluation reads: train (None when only the held-out side was asked for) and test."""

    train: EvalSet | None
    test: EvalSet
    split: str
    """"own" (the source's fixed split: a shard manifest's, or Hub train-/test- files) or "seeded"
    (SEEDED_TEST_FRACTION, by `seeded_test_mask`)."""


@dataclasses.dataclass(frozen=True)
class EvalPlan:
    """What an evaluation reads, planned once: the source's own train and test sides when it has a
    fixed split, else the whole source, split by `seeded_test_mask` when it is loaded."""

    whole: Plan
    train: Plan | None
    test: Plan | None

    @classmethod
    def of(cls, whole: Plan) -> EvalPlan:
        """The sides of the source `whole` covers (a plan of split "all"), derived without reading."""
        if whole.split_spec is None:
            return cls(whole, None, None)
        return cls(whole, with_split(whole, "train"), with_split(whole, "test"))

    @property
    def source(self) -> str:
        return self.whole.source

    @property
    def split(self) -> str:
        """"own" (the source's fixed split) or "seeded"."""
        return "seeded" if self.test is None else "own"


def load_eval_set(plan: Plan, size: int, *, max_rows: int = 0, seed: int = 0,
                  max_image_pixels: int = DataConfig().max_image_pixels) -> EvalSet:
    """Every record of `plan`, shorter side resized to `size` then centre-cropped (stored order).

    max_rows > 0 caps the rows read: the plan's units are then visited in a seeded order and the
    first max_rows rows kept, a seeded sample that never reads the whole of a large source.
    """
    units = list(plan.units)
    if max_rows and plan.rows > max_rows:
        order = np.random.default_rng([seed % 2**64, 0xE7A1]).permutation(len(units))
        units = [units[i] for i in order]
    images, labels = [], []
    counts: Counter = Counter()
    for unit in units:
        for block, bad, records in eval_blocks(unit, plan, size, max_image_pixels):
            counts.update(bad)
            counts["records"] += records
            if block is not None:
                images.append(block["image"])
                labels.append(block["label"])
        if max_rows and sum(len(x) for x in labels) >= max_rows:
            break
    skipped = counts["records"] - sum(len(x) for x in labels)
    if skipped:
        warn(f"eval set {plan.source} ({plan.split}): {describe(counts)}")
    stacked = np.concatenate(images) if images else np.zeros((0, 3, size, size), np.uint8)
    stacked_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    if max_rows:
        stacked, stacked_labels = stacked[:max_rows], stacked_labels[:max_rows]
    return EvalSet(stacked, stacked_labels, plan.class_names, skipped)


def load_eval_splits(plan: EvalPlan, size: int, *, seed: int, need_train: bool = True, max_rows: int = 0,
                     max_image_pixels: int = DataConfig().max_image_pixels) -> EvalSplits:
    """The planned train and test sides: the source's own fixed split, else a seeded one.

    max_rows > 0 caps each side at about max_rows rows (a seeded sample, see `load_eval_set`).
    """
    locate(plan.source)  # gone since it was planned (a long run): one line saying so, not an empty set
    load = functools.partial(load_eval_set, size=size, seed=seed, max_image_pixels=max_image_pixels)
    if plan.test is not None:
        train = load(plan.train, max_rows=max_rows) if need_train else None
        return EvalSplits(train, load(plan.test, max_rows=max_rows), "own")
    everything = load(plan.whole, max_rows=math.ceil(max_rows / SEEDED_TEST_FRACTION))
    test = seeded_test_mask(everything.labels, SEEDED_TEST_FRACTION, seed)
    return EvalSplits(everything.subset(~test) if need_train else None, everything.subset(test), "seeded")


def seeded_test_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Exactly round(fraction * n) rows of each label value (n its rows; -1 included) held out,
    chosen by a permutation seeded by `seed` alone (the rows' stored order is deterministic)."""
    labels = np.asarray(labels)
    keys = np.random.default_rng([seed % 2**64, 0x7E57]).permutation(len(labels))
    test = np.zeros(len(labels), dtype=bool)
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        test[members[np.argsort(keys[members])[:int(round(fraction * len(members)))]]] = True
    return test
