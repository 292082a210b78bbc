"""Rebuild the embedded dataset `builtin:fashion-mnist-10k` from the Fashion-MNIST test split.

    python -m lejepa_platform.data.make_builtin PATH/t10k-images-idx3-ubyte.gz

Uses `build_shards` (lossless PNG, one shard) with a fixed stratified split of 8,000 train / 2,000
test images (seed 0) recorded in the manifest; the labels file is found next to the images file.
The result replaces the packaged shard and manifest; the licence file beside them is kept.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from lejepa_platform.data.shards import build_shards
from lejepa_platform.data.sources import BUILTIN_DIR, MANIFEST

NAME = "fashion-mnist-10k"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
META = {
    "name": NAME,
    "description": "Fashion-MNIST test split: 10,000 greyscale 28x28 images of 10 clothing classes, 1,000 each.",
    "origin": "Zalando Research, Fashion-MNIST (Xiao, Rasul, Vollgraf 2017), t10k idx files",
    "licence": "MIT (Expat), Copyright 2017 Zalando SE; full text in LICENSE",
}


def build(images_idx: str, target: Path = BUILTIN_DIR / NAME) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / NAME
        summary = build_shards(images_idx, str(out), rows_per_shard=10_000, image_format="png",
                               class_names=CLASSES, test_fraction=0.2, split_seed=0, meta=META)
        target.mkdir(parents=True, exist_ok=True)
        for old in target.glob("part-*.parquet"):
            old.unlink()
        for file in sorted(out.iterdir()):
            shutil.copyfile(file, target / file.name)
    summary["out"] = str(target)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images_idx", help="t10k-images-idx3-ubyte(.gz); t10k-labels-idx1-ubyte(.gz) beside it")
    summary = build(parser.parse_args().images_idx)
    print(f"{summary['out']}: {summary['rows']} rows, split {summary['split']['rows']}, "
          f"content {summary['content_hash'][:16]}; {MANIFEST} written")


if __name__ == "__main__":
    main()
