"""Multi-crop views: shapes, seeded reproducibility, crop geometry invariants, the photometric params
the geometric half ships, and parity of every photometric operation with torchvision's reference
implementation (placement parity: test_view_placement.py)."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from lejepa_platform.config import DataConfig
from lejepa_platform.data import views as V

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

PAPER = DataConfig()  # 2 x 224 global (scale 0.3-1) + 6 x 96 local (0.05-0.3)
SMALL = DataConfig(global_views=4, global_size=32, local_views=0)
PLAIN = dataclasses.replace(SMALL, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
PLAIN_PAPER = dataclasses.replace(PAPER, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)


@pytest.fixture(scope="module")
def images(fmnist_sample, image_tools):
    """Six real images of different sizes and shapes."""
    px = fmnist_sample["pixels"]
    sizes = [(28, 28), (64, 48), (40, 90), (256, 256), (33, 61), (120, 80)]
    return [image_tools.colour(px[i], (1.0, 0.7 - 0.1 * i, 0.3 + 0.1 * i), size) for i, size in enumerate(sizes)]


def ids(n):
    return [f"item/{i:04d}" for i in range(n)]


def test_shapes_and_dtypes_paper_views(images):
    out = V.multi_crop(images[:3], ids(3), PAPER, seed=0, epoch=0)
    assert out["global"].shape == (3, 2, 3, 224, 224) and out["global"].dtype == np.uint8
    assert out["local"].shape == (3, 6, 3, 96, 96) and out["local"].dtype == np.uint8


def test_shapes_and_dtypes_four_global_no_local(images):
    out = V.multi_crop(images, ids(6), SMALL, seed=0, epoch=0)
    assert out["global"].shape == (6, 4, 3, 32, 32) and out["global"].dtype == np.uint8
    assert out["local"].shape == (6, 0, 3, 96, 96)


def test_same_seed_and_epoch_give_identical_views_other_epoch_or_seed_do_not(images):
    a = V.multi_crop(images, ids(6), SMALL, seed=3, epoch=1)["global"]
    b = V.multi_crop(images, ids(6), SMALL, seed=3, epoch=1)["global"]
    np.testing.assert_array_equal(a, b)
    for other in (V.multi_crop(images, ids(6), SMALL, seed=3, epoch=2)["global"],
                  V.multi_crop(images, ids(6), SMALL, seed=4, epoch=1)["global"]):
        differs = [not np.array_equal(a[i], other[i]) for i in range(6)]
        assert all(differs)


def test_views_of_a_record_do_not_depend_on_its_batch(images):
    full = V.multi_crop(images[:4], ids(4), PAPER, seed=0, epoch=5)
    order = [2, 0]
    part = V.multi_crop([images[i] for i in order], [ids(4)[i] for i in order], PAPER, seed=0, epoch=5)
    for row, i in enumerate(order):
        np.testing.assert_array_equal(part["global"][row], full["global"][i])
        np.testing.assert_array_equal(part["local"][row], full["local"][i])


def test_views_within_an_image_differ(images):
    out = V.multi_crop(images[3:4], ids(1), SMALL, seed=0, epoch=0)["global"][0]
    assert len({view.tobytes() for view in out}) == 4


def reference_box(u, height, width, scale):
    """torchvision's RandomResizedCrop.get_params written out for one view, fed the same uniforms."""
    area = height * width
    for t in range(V.TRIES):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[t])
        aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[V.TRIES + t])
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return [int(u[V._TOP] * (height - h + 1)), int(u[V._LEFT] * (width - w + 1)), h, w]
    ratio = width / height
    w, h = (width, round(width / (3 / 4))) if ratio < 3 / 4 else ((round(height * 4 / 3), height) if ratio > 4 / 3
                                                                  else (width, height))
    return [(height - h) // 2, (width - w) // 2, h, w]


def test_crop_boxes_match_a_scalar_reference_and_stay_inside():
    rng = np.random.default_rng(0)
    n = 1500
    u = rng.random((n, 2, V.UNIFORMS_PER_VIEW))
    heights = rng.integers(8, 400, n)
    widths = rng.integers(8, 400, n)
    heights[:50] = 10  # strips no try can fit: the centred fallback
    widths[:50] = 400
    scales = np.array([[0.3, 1.0], [0.05, 0.3]])
    boxes = V.crop_boxes(u, heights, widths, scales)
    for i in range(n):
        for v in range(2):
            assert boxes[i, v].tolist() == reference_box(u[i, v], heights[i], widths[i], scales[v])
    top, left, h, w = (boxes[..., k] for k in range(4))
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= heights[:, None]).all() and (left + w <= widths[:, None]).all()


def test_crop_fallback_is_a_centred_clamped_crop_for_extreme_shapes():
    u = np.full((1, 1, V.UNIFORMS_PER_VIEW), 0.5)
    u[..., V._SCALE] = 1.0  # area 1.0 with a 1:1-ish ratio cannot fit a 10 x 400 strip
    boxes = V.crop_boxes(u, np.array([10]), np.array([400]), np.array([[0.99, 1.0]]))
    assert boxes[0, 0].tolist() == [0, (400 - 13) // 2, 10, 13]  # width = round(10 * 4 / 3)


def test_without_photometric_ops_views_are_exact_resized_crops(images):
    out = V.multi_crop(images, ids(6), PLAIN, seed=1, epoch=0)["global"]
    u = V.view_uniforms(1, 0, ids(6), 4)
    heights = np.array([im.shape[0] for im in images])
    widths = np.array([im.shape[1] for im in images])
    boxes = V.crop_boxes(u, heights, widths, np.array([PLAIN.global_scale] * 4))
    for b, image in enumerate(images):
        for v in range(4):
            top, left, h, w = boxes[b, v]
            crop = torch.from_numpy(np.array(image[top:top + h, left:left + w])).permute(2, 0, 1)
            ref = TF.resize(crop, [32, 32], antialias=True)  # torchvision's bilinear resize on uint8
            assert (torch.from_numpy(out[b, v]).int() - ref.int()).abs().max() <= 1


def test_flip_alone_mirrors_exactly(images):
    flipped = dataclasses.replace(PLAIN, flip_p=1.0)
    a = V.multi_crop(images, ids(6), PLAIN, seed=2, epoch=0)["global"]
    b = V.multi_crop(images, ids(6), flipped, seed=2, epoch=0)["global"]
    np.testing.assert_array_equal(b, a[..., ::-1])


def test_grayscale_and_solarize_alone(images):
    grey = V.multi_crop(images, ids(6), dataclasses.replace(PLAIN, grayscale_p=1.0), seed=0, epoch=0)["global"]
    assert (grey[:, :, 0] == grey[:, :, 1]).all() and (grey[:, :, 1] == grey[:, :, 2]).all()
    plain = V.multi_crop(images, ids(6), PLAIN, seed=0, epoch=0)["global"]
    solar = V.multi_crop(images, ids(6), dataclasses.replace(PLAIN, solarize_p=1.0), seed=0, epoch=0)["global"]
    np.testing.assert_array_equal(solar, np.where(plain >= 128, 255 - plain, plain))


@pytest.mark.parametrize("name,mine,ref,lo,hi", [
    ("brightness", V.adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
    ("contrast", V.adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
    ("saturation", V.adjust_saturation, TF.adjust_saturation, 0.8, 1.2),
    ("hue", V.adjust_hue, TF.adjust_hue, -0.1, 0.1),
])
def test_jitter_ops_match_torchvision(images, name, mine, ref, lo, hi):
    x = torch.stack([torch.from_numpy(np.ascontiguousarray(im[:28, :28])).permute(2, 0, 1) for im in images]).float()
    factors = torch.linspace(lo, hi, len(images))
    ours = mine(x.clone(), factors) / 255.0
    theirs = torch.stack([ref(x[i] / 255.0, float(factors[i])) for i in range(len(images))])
    assert (ours - theirs).abs().max().item() < 1e-5


def test_gaussian_blur_matches_torchvision_and_keeps_constants():
    x = torch.rand((5, 3, 40, 40), generator=torch.Generator().manual_seed(0)) * 255
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0])
    ours = V.gaussian_blur(x, sigma)
    theirs = torch.stack([TF.gaussian_blur(x[i:i + 1], [13, 13], [float(s)] * 2)[0] for i, s in enumerate(sigma)])
    assert (ours - theirs).abs().max().item() < 1e-3
    flat = torch.full((2, 3, 16, 16), 77.0)
    assert torch.allclose(V.gaussian_blur(flat, torch.tensor([0.3, 2.0])), flat, atol=1e-4)


@pytest.mark.parametrize("strategy", ["subset", "blend"])
def test_jitter_probability_and_order_come_from_the_params(strategy):
    cfg = dataclasses.replace(PLAIN, jitter_p=0.8)
    x = torch.full((200, 3, 8, 8), 100, dtype=torch.uint8)
    x[:, 0] = 200  # a reddish flat colour: every jitter op changes it
    u = np.random.default_rng(0).random((200, V.UNIFORMS_PER_VIEW))
    out = V.photometric(x, torch.from_numpy(V.photometric_params(u)), cfg, strategy=strategy)
    changed = (out != x).flatten(1).any(dim=1).numpy()
    expected = u[:, V._JITTER] < 0.8
    factors = np.abs(2 * u[:, V._FACTORS] - 1)
    noticeable = (factors > 0.05).all(axis=1)  # tiny factors may round back to the same pixels
    np.testing.assert_array_equal(changed[noticeable], expected[noticeable])


def test_photometric_params_are_the_photometric_uniforms_as_float32():
    u = np.random.default_rng(1).random((3, 5, V.UNIFORMS_PER_VIEW))
    params = V.photometric_params(u)
    assert params.shape == (3, 5, V.PHOTOMETRIC_PARAMS) == (3, 5, 14) and params.dtype == np.float32
    np.testing.assert_array_equal(params, u[..., V._FLIP:].astype(np.float32))
    assert V.UNIFORMS_PER_VIEW - V._FLIP == V.PHOTOMETRIC_PARAMS  # flip is the first photometric uniform


def test_photometric_rejects_an_unknown_strategy():
    with pytest.raises(ValueError, match="strategy 'fast' is not one of auto, subset, blend"):
        V.photometric(torch.zeros((1, 3, 4, 4), dtype=torch.uint8), torch.zeros((1, V.PHOTOMETRIC_PARAMS)), PLAIN,
                      strategy="fast")


def test_without_the_photometric_half_multi_crop_ships_crops_and_float32_params(images):
    out = V.multi_crop(images[:3], ids(3), PAPER, seed=4, epoch=1, photometric=False)
    assert sorted(out) == ["global", "global_params", "local", "local_params"]
    assert out["global_params"].shape == (3, 2, V.PHOTOMETRIC_PARAMS) and out["global_params"].dtype == np.float32
    assert out["local_params"].shape == (3, 6, V.PHOTOMETRIC_PARAMS) and out["local_params"].dtype == np.float32
    u = V.photometric_params(V.view_uniforms(4, 1, ids(3), 8))
    np.testing.assert_array_equal(np.concatenate([out["global_params"], out["local_params"]], axis=1), u)
    plain = V.multi_crop(images[:3], ids(3), PLAIN_PAPER, seed=4, epoch=1)
    np.testing.assert_array_equal(out["global"], plain["global"])  # the crops, untouched
    np.testing.assert_array_equal(out["local"], plain["local"])
    assert sorted(V.multi_crop(images, ids(6), SMALL, seed=0, epoch=0, photometric=False)) == ["global", "global_params",
                                                                                              "local"]


@pytest.mark.parametrize("cfg", [PAPER, SMALL], ids=["paper", "small"])
def test_multi_crop_is_its_geometric_half_then_augment_views(images, cfg):
    whole = V.multi_crop(images, ids(6), cfg, seed=7, epoch=2)
    crops = V.multi_crop(images, ids(6), cfg, seed=7, epoch=2, photometric=False)
    batch = {**{k: torch.from_numpy(v) for k, v in crops.items()}, "label": torch.arange(6)}
    out = V.augment_views(batch, cfg)
    assert sorted(out) == sorted(k for k in batch if not k.endswith("_params"))
    assert torch.equal(out["label"], batch["label"])
    for name in ("global", "local") if cfg.local_views else ("global",):
        np.testing.assert_array_equal(out[name].numpy(), whole[name])


def test_normalize_uses_imagenet_statistics_on_any_shape():
    mean = torch.tensor(V.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(V.IMAGENET_STD).view(3, 1, 1)
    x = torch.randint(0, 256, (2, 4, 3, 5, 5), dtype=torch.uint8)
    y = V.normalize(x)
    assert y.dtype == torch.float32 and y.shape == x.shape and y.device == x.device
    torch.testing.assert_close(y, (x.float() / 255 - mean) / std)


def test_center_views_are_the_centred_square():
    image = np.arange(40 * 20 * 3, dtype=np.uint8).reshape(40, 20, 3)
    out = V.center_views([image], 20)
    np.testing.assert_array_equal(out[0], image[10:30].transpose(2, 0, 1))
    assert V.center_views([image], 32).shape == (1, 3, 32, 32)


def test_decode_side_covers_the_smallest_crop():
    side = V.decode_side(PAPER)
    assert side == math.ceil(max(224 / math.sqrt(0.3), 96 / math.sqrt(0.05)))
    assert V.decode_side(SMALL) == math.ceil(32 / math.sqrt(0.3))
