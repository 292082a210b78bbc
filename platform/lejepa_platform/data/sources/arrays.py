""".npy / .npz arrays of uint8 images, with optional integer labels."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from lejepa_platform.data.sources.base import RawRecord, Source
from lejepa_platform.errors import UserError


class ArraySource(Source):
    """uint8 images (N, H, W), (N, H, W, C) or (N, C, H, W); .npz: `images` or `x`, optional `labels` or `y`."""

    kind = "array"

    def _arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        try:
            loaded = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read array file {str(self.path)!r}: {err}") from None
        if isinstance(loaded, np.ndarray):
            images, labels = loaded, None
        else:
            keys = list(loaded.keys())
            image_key = next((k for k in ("images", "x") if k in keys), None)
            if image_key is None:
                raise UserError(f"{str(self.path)!r} has arrays {keys}; expected images under 'images' or 'x'")
            label_key = next((k for k in ("labels", "y") if k in keys), None)
            images = loaded[image_key]
            labels = np.asarray(loaded[label_key]) if label_key else None
        if images.dtype != np.uint8:
            raise UserError(f"{str(self.path)!r}: images must be uint8 (0-255), got {images.dtype}")
        if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[3] not in (1, 3, 4):
            images = images.transpose(0, 2, 3, 1)
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3, 4)):
            raise UserError(f"{str(self.path)!r}: images of shape {images.shape} are not (N, H, W[, C])")
        if labels is not None and (labels.shape != (images.shape[0],) or labels.dtype.kind not in "iu"):
            raise UserError(f"{str(self.path)!r}: labels must be integers of shape ({images.shape[0]},), got "
                            f"{labels.dtype} {labels.shape}")
        return images, labels

    def records(self, skip: int = 0) -> Iterator[RawRecord]:
        images, labels = self._arrays()
        for i in range(skip, images.shape[0]):
            yield RawRecord(f"{self.path.name}/{i:06d}", int(labels[i]) if labels is not None else -1,
                            np.asarray(images[i]))
