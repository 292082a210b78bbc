"""SIGReg on two gloo ranks: each rank holds half of a fixed batch and must see the single-process
statistic of the whole batch, a gradient that is world_size x the single-process one for its rows
(DDP's averaging then restores it), and the same directions as every other rank."""

import pytest
import torch
from gloo import run_in_gloo

from lejepa_platform.distributed import world_size
from lejepa_platform.loss import sigreg, slice_directions

pytestmark = pytest.mark.dist

WORLD = 2
VIEWS, ROWS, DIM, SLICES, SEED, STEP = 2, 48, 16, 40, 11, 3


def _batch() -> torch.Tensor:
    """(V, WORLD * ROWS, DIM), non-Gaussian so the statistic is far from its floor."""
    z = torch.randn(VIEWS, WORLD * ROWS, DIM, generator=torch.Generator().manual_seed(0))
    return z * torch.linspace(0.5, 2.0, DIM) + 0.3


def _rank_step(rank: int) -> dict:
    directions = slice_directions(DIM, SLICES, seed=SEED, step=STEP)
    z = _batch()[:, rank * ROWS:(rank + 1) * ROWS].clone().requires_grad_(True)
    value = sigreg(z, directions, chunk_size=7)
    value.backward()
    return {"world_size": world_size(), "value": value.detach(), "grad": z.grad, "directions": directions}


@pytest.fixture(scope="module")
def ranks() -> list:
    return run_in_gloo(WORLD, _rank_step)


@pytest.fixture(scope="module")
def single() -> tuple:
    z = _batch().requires_grad_(True)
    value = sigreg(z, slice_directions(DIM, SLICES, seed=SEED, step=STEP))
    value.backward()
    return value.detach(), z.grad


def test_every_rank_sees_the_single_process_value_of_the_whole_batch(ranks, single):
    value, _ = single
    assert [r["world_size"] for r in ranks] == [WORLD, WORLD]
    for r in ranks:
        assert abs(float(r["value"]) / float(value) - 1) < 1e-5
    half = sigreg(_batch()[:, :ROWS], slice_directions(DIM, SLICES, seed=SEED, step=STEP))
    assert abs(float(half) / float(value) - 1) > 1e-2  # without the all-reduce the ranks would disagree


def test_rank_gradient_is_world_size_times_single_process_share(ranks, single):
    _, grad = single
    for rank, r in enumerate(ranks):
        expected = WORLD * grad[:, rank * ROWS:(rank + 1) * ROWS]
        assert float((r["grad"] - expected).abs().max() / expected.abs().max()) < 1e-5
    averaged = torch.cat([r["grad"] for r in ranks], dim=1) / WORLD  # what DDP's averaging yields
    assert float((averaged - grad).abs().max() / grad.abs().max()) < 1e-5


def test_ranks_draw_identical_directions(ranks):
    assert torch.equal(ranks[0]["directions"], ranks[1]["directions"])
    assert torch.equal(ranks[0]["directions"], slice_directions(DIM, SLICES, seed=SEED, step=STEP))
