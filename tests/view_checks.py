"""Checks shared by the view tests on CPU and GPU (importable from every test folder: pytest puts
tests/ on sys.path for its conftest.py)."""

from __future__ import annotations

import numpy as np
import torch

from lejepa_platform.config import DataConfig
from lejepa_platform.data import views as V
from lejepa_platform.data.decode import decode_batch


def assert_views_match(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal, or apart by one grey level on at most 0.1 % of the pixels (a blend rounding differently)."""
    assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8
    diff = (a.int() - b.int()).abs()
    assert diff.max().item() <= 1 and (diff > 0).sum().item() <= 1e-3 * diff.numel()


def jpeg_records(fmnist_sample: dict, image_tools, cfg: DataConfig) -> tuple[list[np.ndarray], list[str]]:
    """Twelve colour photographs of different shapes, stored as JPEG and decoded as the pipeline does."""
    sizes = [(256, 256), (300, 200), (180, 320), (240, 240)]
    data = [image_tools.encode(image_tools.colour(fmnist_sample["pixels"][i], (1.0, 0.4 + 0.05 * i, 0.9 - 0.06 * i),
                                                  sizes[i % 4]), "JPEG", quality=90) for i in range(12)]
    arrays, kept, bad = decode_batch(data, 50_000_000, V.decode_side(cfg))
    assert len(kept) == 12 and not bad
    return arrays, [f"jpeg/{i:03d}" for i in range(12)]


def png_records(fmnist_sample: dict, cfg: DataConfig) -> tuple[list[np.ndarray], list[str]]:
    """The embedded dataset's first 60 records (grey PNGs), decoded as the pipeline does."""
    arrays, kept, bad = decode_batch(fmnist_sample["png"], 50_000_000, V.decode_side(cfg))
    assert len(kept) == 60 and not bad
    return arrays, list(fmnist_sample["ids"])
