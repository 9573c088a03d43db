"""Mask generators (pre-training patterns, cloud gaps) and the masked MSE loss."""

from __future__ import annotations

import pytest
import torch

from models.losses import masked_mse
from models.masking import (
    cloud_gap_mask,
    pretraining_mask,
    spatial_mask,
    spatiotemporal_mask,
    temporal_mask,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_spatial_mask_is_constant_over_time_at_rate_p() -> None:
    mask = spatial_mask((16, 5, 40, 40), 0.4, gen())
    assert mask.shape == (16, 5, 40, 40) and mask.dtype == torch.bool
    assert torch.equal(mask, mask[:, :1].expand_as(mask))
    assert mask.float().mean().item() == pytest.approx(0.4, abs=0.02)


def test_temporal_mask_is_constant_over_space_at_rate_p() -> None:
    mask = temporal_mask((128, 50, 3, 7), 0.4, gen())
    assert torch.equal(mask, mask[:, :, :1, :1].expand_as(mask))
    assert mask.float().mean().item() == pytest.approx(0.4, abs=0.02)


def test_spatiotemporal_mask_is_independent_at_rate_p() -> None:
    mask = spatiotemporal_mask((8, 10, 30, 30), 0.25, gen())
    assert mask.float().mean().item() == pytest.approx(0.25, abs=0.01)
    # varies along both time and space
    assert not torch.equal(mask, mask[:, :1].expand_as(mask))
    assert not torch.equal(mask, mask[:, :, :1, :1].expand_as(mask))


def test_blocks_cover_cells_and_are_cropped() -> None:
    mask = spatiotemporal_mask((64, 2, 10, 13), 0.5, gen(), block=4)
    assert mask.shape == (64, 2, 10, 13)
    cells = mask[:, :, ::4, ::4]
    assert torch.equal(mask, cells.repeat_interleave(4, 2).repeat_interleave(4, 3)[:, :, :10, :13])
    assert cells.float().mean().item() == pytest.approx(0.5, abs=0.03)
    spatial = spatial_mask((4, 3, 9, 9), 0.5, gen(), block=3)
    assert torch.equal(spatial, spatial[:, :1].expand_as(spatial))
    assert torch.equal(spatial, spatial[:, :, ::3, ::3].repeat_interleave(3, 2).repeat_interleave(3, 3))


def test_pretraining_mask_follows_one_pattern_per_sample() -> None:
    mask = pretraining_mask((300, 6, 8, 8), gen(), p=0.4)
    constant_in_time = (mask == mask[:, :1]).flatten(1).all(1)
    constant_in_space = (mask == mask[:, :, :1, :1]).flatten(1).all(1)
    # each pattern is chosen for about a third of the samples (independent draws are neither constant)
    assert constant_in_time.float().mean().item() == pytest.approx(1 / 3, abs=0.1)
    assert constant_in_space.float().mean().item() == pytest.approx(1 / 3, abs=0.1)
    assert mask.float().mean().item() == pytest.approx(0.4, abs=0.03)
    only_temporal = pretraining_mask((20, 6, 8, 8), gen(), patterns=("temporal",))
    assert torch.equal(only_temporal, only_temporal[:, :, :1, :1].expand_as(only_temporal))
    with pytest.raises(ValueError, match="patterns"):
        pretraining_mask((2, 6, 8, 8), gen(), patterns=("cloudy",))


def test_masks_are_deterministic_with_a_seed() -> None:
    shape = (4, 6, 9, 9)
    for make in (
        lambda g: pretraining_mask(shape, g),
        lambda g: spatiotemporal_mask(shape, 0.4, g, block=2),
        lambda g: cloud_gap_mask(8, 20, g),
    ):
        assert torch.equal(make(gen(3)), make(gen(3)))
        assert not torch.equal(make(gen(3)), make(gen(4)))


@pytest.mark.parametrize("mode", ["random", "contiguous", "mixed"])
@pytest.mark.parametrize("rate", [0.0, 0.25, 0.8])
def test_cloud_gaps_hide_exactly_the_rate(mode: str, rate: float) -> None:
    mask = cloud_gap_mask(50, 24, gen(), rate=rate, mode=mode)
    assert mask.shape == (50, 24)
    assert torch.all(mask.sum(1) == round(rate * 24))


def test_contiguous_gaps_are_one_run_random_gaps_are_not() -> None:
    def runs(mask: torch.Tensor) -> torch.Tensor:
        starts = mask & ~torch.nn.functional.pad(mask, (1, 0))[:, :-1]
        return starts.sum(1)

    run = cloud_gap_mask(200, 30, gen(), rate=0.5, mode="contiguous")
    assert torch.all(runs(run) == 1)
    # the start is uniform over the 16 possible offsets
    first = run.float().argmax(1)
    assert first.min() == 0 and first.max() == 15
    scattered = cloud_gap_mask(200, 30, gen(), rate=0.5, mode="random")
    assert runs(scattered).float().mean() > 4
    assert scattered.float().mean(0).min() > 0.3  # every date gets hidden about half the time
    mixed = runs(cloud_gap_mask(200, 30, gen(), rate=0.5, mode="mixed"))
    assert 0.3 < (mixed == 1).float().mean() < 0.7


def test_cloud_gap_rate_range_keeps_one_date() -> None:
    mask = cloud_gap_mask(2000, 10, gen(), rate=(0.0, 0.8))
    counts = mask.sum(1)
    assert counts.min() == 0 and counts.max() == 8
    assert counts.float().mean().item() == pytest.approx(4.0, abs=0.2)
    assert torch.all(cloud_gap_mask(10, 3, gen(), rate=1.0).sum(1) == 2)
    assert not cloud_gap_mask(5, 1, gen(), rate=0.8).any()
    with pytest.raises(ValueError, match="mode"):
        cloud_gap_mask(2, 5, gen(), mode="blocks")
    with pytest.raises(ValueError, match="rate"):
        cloud_gap_mask(2, 5, gen(), rate=(0.5, 0.2))


def test_masked_mse_counts_only_masked_entries() -> None:
    prediction = torch.zeros(1, 2, 3, 1, 2, requires_grad=True)  # (B, T, C, H, W)
    target = torch.full((1, 2, 3, 1, 2), float("nan"))
    target[0, 0, :, 0, 1] = torch.tensor([1.0, 2.0, 3.0])
    mask = torch.zeros(1, 2, 1, 1, 2, dtype=torch.bool)
    mask[0, 0, 0, 0, 1] = True
    loss = masked_mse(prediction, target, mask)
    assert loss.item() == pytest.approx((1 + 4 + 9) / 3)
    loss.backward()
    expected = torch.zeros_like(prediction)
    expected[0, 0, :, 0, 1] = -2 * torch.tensor([1.0, 2.0, 3.0]) / 3
    assert torch.allclose(prediction.grad, expected)
    empty = masked_mse(prediction, target, torch.zeros_like(mask))
    assert empty.item() == 0.0
    empty.backward()


def test_masked_mse_float32_under_autocast() -> None:
    prediction, target = torch.randn(2, 3, 4, 5, 5), torch.randn(2, 3, 4, 5, 5)
    mask = torch.rand(2, 3, 1, 5, 5) > 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = masked_mse(prediction.bfloat16(), target, mask)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(masked_mse(prediction.bfloat16().float(), target, mask).item(), rel=1e-6)
