"""Where the photometric half of the views runs (data.augment_on): the data side (multi_crop) or the
trainer's device (multi_crop(photometric=False), then augment_views after the copy). Same records,
seed and epoch must give the same uint8 views either way, on real decoded JPEG and PNG records; the
device path must hold no host-device synchronisation, which a full-graph torch.compile proves."""

import dataclasses

import numpy as np
import pytest
import torch

import view_checks
from view_checks import assert_views_match

from lejepa_platform.config import DataConfig
from lejepa_platform.data import views as V
from lejepa_platform.defaults import default_run_config

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

PAPER = DataConfig()  # 2 x 224 + 6 x 96, every photometric op at the paper's probabilities
DEFAULT = default_run_config().data  # the embedded default: 4 x 32, no local views, no blur


@pytest.fixture(scope="module")
def jpeg_records(fmnist_sample, image_tools):
    return view_checks.jpeg_records(fmnist_sample, image_tools, PAPER)


@pytest.fixture(scope="module")
def png_records(fmnist_sample):
    return view_checks.png_records(fmnist_sample, DEFAULT)


def data_placement(arrays, ids, cfg, seed, epoch):
    return V.multi_crop(arrays, ids, cfg, seed=seed, epoch=epoch)


def device_placement(arrays, ids, cfg, seed, epoch, *, blocks=1, strategy="blend"):
    """Crops made in `blocks` data-side blocks, concatenated into one trainer batch, then augment_views."""
    cut = np.array_split(np.arange(len(ids)), blocks)
    parts = [V.multi_crop([arrays[i] for i in rows], [ids[i] for i in rows], cfg, seed=seed, epoch=epoch,
                          photometric=False) for rows in cut]
    batch = {key: torch.cat([torch.from_numpy(part[key]) for part in parts]) for key in parts[0]}
    return V.augment_views(batch, cfg, strategy=strategy)


@pytest.mark.parametrize("records,cfg", [("jpeg_records", PAPER), ("png_records", DEFAULT)],
                         ids=["paper_views_jpeg", "embedded_default_png"])
def test_both_placements_give_the_same_views(request, records, cfg):
    """On CPU the data side takes the subset strategy and the device helper here the blend, so this
    is also the test that the two strategies agree; rows reach the trainer from several blocks."""
    arrays, ids = request.getfixturevalue(records)
    for seed, epoch in ((0, 0), (5, 3)):
        on_data = data_placement(arrays, ids, cfg, seed, epoch)
        on_device = device_placement(arrays, ids, cfg, seed, epoch, blocks=3)
        assert sorted(on_device) == ["global", "local"]  # the params are dropped
        assert on_device["local"].shape == on_data["local"].shape
        for name in ("global", "local") if cfg.local_views else ("global",):
            assert_views_match(on_device[name], torch.from_numpy(on_data[name]))


def test_placements_agree_with_every_op_on_every_view(jpeg_records):
    """The paper's probabilities leave some views plain; here nothing is left out."""
    arrays, ids = jpeg_records
    cfg = dataclasses.replace(PAPER, flip_p=1.0, jitter_p=1.0, grayscale_p=0.5, blur_p=1.0, solarize_p=1.0)
    on_data = data_placement(arrays, ids, cfg, 2, 0)
    on_device = device_placement(arrays, ids, cfg, 2, 0)
    for name in ("global", "local"):
        assert_views_match(on_device[name], torch.from_numpy(on_data[name]))


def test_device_placement_on_cpu_with_subset_strategy_is_exact(png_records):
    arrays, ids = png_records
    on_data = data_placement(arrays, ids, DEFAULT, 1, 4)
    on_device = device_placement(arrays, ids, DEFAULT, 1, 4, blocks=2, strategy="auto")  # CPU: subset
    np.testing.assert_array_equal(on_device["global"].numpy(), on_data["global"])


def test_the_blend_path_compiles_as_one_graph_and_matches(jpeg_records):
    """fullgraph=True fails on a graph break: nonzero, boolean-mask indexing, .item(), .tolist() or
    any data-dependent shape would be one."""
    arrays, ids = jpeg_records
    cfg = dataclasses.replace(PAPER, global_size=64, grayscale_p=0.5)
    crops = V.multi_crop(arrays, ids, cfg, seed=3, epoch=0, photometric=False)
    views = torch.from_numpy(crops["global"]).flatten(0, 1)
    params = torch.from_numpy(crops["global_params"]).flatten(0, 1)
    compiled = torch.compile(V.photometric, fullgraph=True, dynamic=False)
    out = compiled(views, params, cfg)  # "auto" inside a compiled graph is the blend
    assert_views_match(out, V.photometric(views, params, cfg, strategy="subset"))
