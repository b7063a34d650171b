"""Gaussian smoothing of anomaly maps, with sigma in pixels of the map it is applied to.

Residual and distance maps of real images are noisy at the resolution of the feature grid:
one odd cell decides a max-based image score. Smoothing the map upsampled to the input
before taking the max (as PatchCore and PaDiM do, sigma = 4 px) makes that score follow
regions instead of single cells.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur


def kernel_size(sigma: float) -> int:
    """Odd kernel covering +-4 sigma."""
    return 2 * max(1, round(4 * sigma)) + 1


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Maps [B, H, W] smoothed with a Gaussian of `sigma` px; sigma <= 0 returns them unchanged."""
    if sigma <= 0:
        return maps
    # reflect padding needs half the kernel below the map size: cap it on small maps
    limit = 2 * (min(maps.shape[-2:]) - 1) - 1
    size = min(kernel_size(sigma), max(1, limit - (limit + 1) % 2))
    return gaussian_blur(maps[:, None], [size, size], [float(sigma), float(sigma)])[:, 0]


def upsample_and_smooth(grid: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """A feature-grid map [B, h, w] as an input-sized anomaly map [B, H, W]: bilinear upsampling,
    then Gaussian smoothing of `sigma` input pixels."""
    maps = F.interpolate(grid[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return gaussian_smooth(maps, sigma)
