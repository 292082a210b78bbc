"""Encoded image bytes -> RGB pixels, refusing what would hurt a worker.

Every record that cannot become pixels is classified (undecodable, truncated, too large) instead of
raised, so one bad file costs one skipped row and a count, never a crashed task. The size check
reads only the header, before any pixel is decoded: a 100-byte file that claims 30000 x 30000 pixels
is rejected without allocating 2.7 GB.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image

REASONS = ("undecodable", "truncated", "too_large")
"""Why a record was skipped, in the order reports list them."""


class BadImage(Exception):
    """A record that cannot become pixels; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only) and check the claimed size against `max_pixels`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise BadImage("too_large", str(err)) from None
    except Exception as err:  # noqa: BLE001 - any parser failure means "not an image we can read"
        raise _bad(err) from None
    width, height = image.size
    if width < 1 or height < 1:
        raise BadImage("undecodable", f"empty image {width}x{height}")
    if width * height > max_pixels:
        raise BadImage("too_large", f"{width}x{height} exceeds {max_pixels} pixels")
    return image


def load_image(data: bytes, max_pixels: int, min_side: int = 0) -> Image.Image:
    """Fully decoded image in its own mode. JPEGs are decoded at a reduced scale (a DCT shortcut)
    when that still leaves the shorter side at least `min_side` pixels."""
    image = open_image(data, max_pixels)
    if min_side > 0 and image.format == "JPEG":
        image.draft(image.mode, (min_side, min_side))
    try:
        image.load()
    except Exception as err:  # noqa: BLE001
        raise _bad(err) from None
    return image


def _bad(err: Exception) -> BadImage:
    reason = "truncated" if "truncated" in str(err).lower() else "undecodable"
    return BadImage(reason, f"{type(err).__name__}: {err}")


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8; grey, palette, alpha and 16-bit modes are converted."""
    if image.mode in ("I;16", "I"):  # 16-bit grey: the top 8 bits, as a viewer would show it
        grey = np.clip(np.round(np.asarray(image, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image)  # writable (np.asarray would be a read-only view torch warns about)


def decode_rgb(data: bytes, max_pixels: int, min_side: int = 0) -> np.ndarray:
    """Bytes -> (H, W, 3) uint8, or BadImage."""
    image = load_image(data, max_pixels, min_side)
    try:
        return to_rgb_array(image)
    except Exception as err:  # noqa: BLE001 - odd modes and broken palettes
        raise BadImage("undecodable", f"{type(err).__name__}: {err}") from None


def decode_batch(images: Sequence[bytes], max_pixels: int, min_side: int = 0) -> tuple[list[np.ndarray], list[int], Counter]:
    """Decode what can be decoded: (arrays, indices of the kept records, Counter of skip reasons)."""
    arrays: list[np.ndarray] = []
    kept: list[int] = []
    bad: Counter = Counter()
    for index, data in enumerate(images):
        try:
            arrays.append(decode_rgb(data, max_pixels, min_side))
        except BadImage as err:
            bad[err.reason] += 1
            continue
        kept.append(index)
    return arrays, kept, bad


def encode(image: Image.Image, image_format: str) -> bytes:
    """Lossless PNG (grey, RGB and alpha modes kept) or JPEG quality 95 (RGB or grey)."""
    out = io.BytesIO()
    if image_format == "png":
        if image.mode not in ("L", "LA", "RGB", "RGBA", "I;16"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        image.save(out, format="PNG", compress_level=9)
    elif image_format == "jpeg":
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        image.save(out, format="JPEG", quality=95)
    else:
        raise ValueError(f"unknown image format {image_format!r}")
    return out.getvalue()


def array_to_image(array: np.ndarray) -> Image.Image:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 -> PIL image."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"cannot make an image from an array of shape {array.shape} and dtype {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(array))


def count_reasons(counters: Iterable[Counter]) -> dict[str, int]:
    """Sum skip counters into {reason: n} with every reason present (zeros included)."""
    total: Counter = Counter()
    for counter in counters:
        total.update(counter)
    return {reason: int(total.get(reason, 0)) for reason in REASONS}
