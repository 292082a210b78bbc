"""Decoding: every bad record is classified (never raised past decode_batch), sizes are checked from
the header before any pixel is allocated, and good images come back as exact RGB pixels."""

import io
import time

import numpy as np
import pytest
from PIL import Image

from lejepa_platform.data.decode import BadImage, decode_batch, decode_rgb, encode, open_image

pytestmark = pytest.mark.unit

LIMIT = 50_000_000


def test_grey_png_becomes_rgb_with_identical_channels(fmnist_sample):
    rgb = decode_rgb(fmnist_sample["png"][0], LIMIT)
    assert rgb.shape == (28, 28, 3) and rgb.dtype == np.uint8 and rgb.flags.writeable
    for channel in range(3):
        np.testing.assert_array_equal(rgb[:, :, channel], fmnist_sample["pixels"][0])


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA", "I;16", "CMYK"])
def test_other_modes_become_rgb(fmnist_sample, mode):
    pixels = fmnist_sample["pixels"][1]
    if mode == "P":  # grey palette: index i is the colour (i, i, i)
        image = Image.frombytes("P", (28, 28), pixels.tobytes())
        image.putpalette([v for i in range(256) for v in (i, i, i)])
    elif mode == "I;16":
        image = Image.fromarray(pixels.astype(np.uint16) * 257)
    else:
        image = Image.fromarray(pixels).convert("RGB").convert(mode)
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    out = io.BytesIO()
    image.save(out, format=fmt)
    rgb = decode_rgb(out.getvalue(), LIMIT)
    assert rgb.shape == (28, 28, 3) and rgb.dtype == np.uint8
    if mode in ("RGBA", "P", "LA", "I;16"):  # lossless modes: the grey values survive exactly
        np.testing.assert_array_equal(rgb[:, :, 0], fmnist_sample["pixels"][1])


def test_png_encode_is_lossless_for_grey_and_rgb(fmnist_sample, image_tools):
    grey = Image.fromarray(fmnist_sample["pixels"][2])
    colour = Image.fromarray(image_tools.colour(fmnist_sample["pixels"][2], (1.0, 0.5, 0.2), (28, 28)))
    for image in (grey, colour):
        back = Image.open(io.BytesIO(encode(image, "png")))
        assert back.mode == image.mode
        np.testing.assert_array_equal(np.asarray(back), np.asarray(image))


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.8])
def test_truncated_png_is_reported_as_truncated(fmnist_sample, fraction):
    data = fmnist_sample["png"][3]
    with pytest.raises(BadImage) as err:
        decode_rgb(data[: int(len(data) * fraction)], LIMIT)
    assert err.value.reason == "truncated"


def test_truncated_jpeg_is_reported_as_truncated(fmnist_sample, image_tools):
    data = image_tools.encode(image_tools.colour(fmnist_sample["pixels"][4], (1, 1, 1), (64, 64)), "JPEG")
    for fraction in (0.3, 0.8):
        with pytest.raises(BadImage) as err:
            decode_rgb(data[: int(len(data) * fraction)], LIMIT)
        assert err.value.reason == "truncated"


@pytest.mark.parametrize("junk", [b"", b"hello", bytes(range(256)) * 3, b"\x89PNG\r\n\x1a\n" + bytes(100)])
def test_garbage_is_undecodable(junk):
    with pytest.raises(BadImage) as err:
        decode_rgb(junk, LIMIT)
    assert err.value.reason == "undecodable"


def test_bomb_header_is_rejected_before_decoding(image_tools):
    started = time.perf_counter()
    for width, height, limit in ((30000, 30000, LIMIT), (8000, 8000, LIMIT), (100, 100, 9999)):
        with pytest.raises(BadImage) as err:
            decode_rgb(image_tools.bomb(width, height), limit)
        assert err.value.reason == "too_large"
    assert time.perf_counter() - started < 1.0  # no pixel buffer of 2.7 GB was ever allocated
    assert open_image(image_tools.bomb(100, 100), 10_000).size == (100, 100)  # exactly at the limit: allowed


def test_decode_batch_keeps_good_records_in_order_and_counts_the_rest(fmnist_sample, image_tools):
    good = fmnist_sample["png"][:6]
    batch = [good[0], b"junk", good[1], good[2][:200], image_tools.bomb(30000, 30000), good[3], b"", good[4]]
    arrays, kept, bad = decode_batch(batch, LIMIT)
    assert kept == [0, 2, 5, 7]
    assert dict(bad) == {"undecodable": 2, "truncated": 1, "too_large": 1}
    for array, index in zip(arrays, [0, 1, 3, 4]):
        np.testing.assert_array_equal(array[:, :, 0], fmnist_sample["pixels"][index])


def test_jpeg_draft_decodes_at_reduced_scale_but_keeps_min_side(fmnist_sample, image_tools):
    big = image_tools.encode(image_tools.colour(fmnist_sample["pixels"][5], (1, .8, .6), (1600, 1200)), "JPEG")
    assert decode_rgb(big, LIMIT).shape == (1200, 1600, 3)
    reduced = decode_rgb(big, LIMIT, min_side=300)
    assert reduced.shape == (300, 400, 3)  # 1/4 scale: the largest reduction keeping >= 300 px
    assert decode_rgb(big, LIMIT, min_side=700).shape == (1200, 1600, 3)  # 1/2 would give 600 < 700
