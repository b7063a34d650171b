"""Upsample-and-smooth as two matrix products equals interpolation + torchvision's 2-D blur."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from ad_lightning.nn.smoothing import capped_kernel_size, upsample_and_smooth


def reference(grid: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    maps = F.interpolate(grid[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    if sigma <= 0:
        return maps
    k = capped_kernel_size(sigma, min(size))
    return gaussian_blur(maps[:, None], [k, k], [sigma, sigma])[:, 0]


@pytest.mark.parametrize(
    ("grid_hw", "size", "sigma"),
    [
        ((32, 32), (256, 256), 4.0),
        ((7, 9), (50, 64), 2.0),
        ((16, 16), (64, 64), 0.0),
        ((8, 8), (8, 8), 4.0),
    ],
)
def test_matrix_smoothing_matches_interpolate_and_2d_blur(grid_hw, size, sigma) -> None:
    grid = torch.rand(3, *grid_hw, generator=torch.Generator().manual_seed(0)) * 10
    expected = reference(grid, size, sigma)
    torch.testing.assert_close(
        upsample_and_smooth(grid, size, sigma), expected, atol=1e-4, rtol=1e-5
    )


def test_smoothing_spreads_a_single_hot_cell() -> None:
    maps = torch.zeros(1, 64, 64)
    maps[0, 32, 32] = 1.0
    smooth = upsample_and_smooth(maps, (64, 64), 4.0)
    assert smooth.max() < 0.05 and smooth.argmax() == maps.argmax()
    assert torch.isclose(smooth.sum(), torch.tensor(1.0), atol=1e-3)
    torch.testing.assert_close(upsample_and_smooth(maps, (64, 64), 0.0), maps)


def test_maps_are_float32_under_mixed_precision() -> None:
    """Under bf16 autocast (trainer.precision=bf16-mixed scores the test so) the products would
    run in bf16: the map's values, and its max (most methods' image score), rounded to a few
    distinct levels."""
    grid = torch.rand(4, 16, 16, generator=torch.Generator().manual_seed(0)) + 3.0
    exact = upsample_and_smooth(grid, (64, 64), 4.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = upsample_and_smooth(grid, (64, 64), 4.0)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, exact, rtol=1e-6, atol=1e-6)
