"""The fixed train/test split.

Split: with `test_fraction` > 0 a fixed train/test split is recorded in the manifest, not in the
shards: a record is in the test split when a seeded 63-bit hash of its id is at most its class's
threshold; thresholds are chosen so each class contributes exactly round(fraction * class size).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np



def split_key(seed: int, record_id: str) -> int:
    """Seeded 63-bit hash of a record id (independent of process, platform and row order)."""
    digest = hashlib.blake2b(f"{seed}\x00{record_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def split_spec(labels: np.ndarray, keys: np.ndarray, fraction: float, seed: int) -> dict:
    thresholds: dict[str, int] = {}
    test = 0
    for label in np.unique(labels):
        group = np.sort(keys[labels == label])
        k = int(round(fraction * len(group)))
        thresholds[str(int(label))] = int(group[k - 1]) if k > 0 else -1
        test += k
    return {"method": "stratified" if (labels >= 0).any() else "random", "seed": seed, "test_fraction": fraction,
            "rows": {"train": int(len(labels) - test), "test": int(test)}, "test_max_key": thresholds}


def split_mask(ids: Sequence[str], labels: Sequence[int] | np.ndarray, spec: dict | None, split: str) -> np.ndarray:
    """Boolean mask of the rows in `split` (train, test or all) under a manifest's split spec."""
    if split == "all" or spec is None:
        return np.ones(len(ids), dtype=bool)
    thresholds = spec["test_max_key"]
    seed = spec["seed"]
    test = np.fromiter((split_key(seed, i) <= thresholds.get(str(int(lab)), -1) for i, lab in zip(ids, labels)),
                       dtype=bool, count=len(ids))
    return test if split == "test" else ~test
