"""SSIM (Wang et al. 2004) as a per-pixel map and as a differentiable loss.

The AE (SSIM) baseline trains on 1 - SSIM and scores with the residual map 1 - SSIM, which
compares local luminance, contrast and structure in a Gaussian window instead of single
pixels. torchmetrics computes the map at full resolution (reflection-padded borders) and it
is differentiable, so it is used directly rather than re-implemented.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.image import structural_similarity_index_measure


def ssim_map(
    x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, sigma: float = 1.5
) -> torch.Tensor:
    """Per-pixel SSIM [B, C, H, W] of two image batches, Gaussian window of std `sigma`.

    `data_range` is the span of pixel values (1 for [0, 1] images, 2 for [-1, 1]); it sets
    the stabilising constants. A float is passed on purpose: a (min, max) tuple would make
    torchmetrics clamp the images and cut the gradient outside that range.
    """
    _, full = structural_similarity_index_measure(
        x, y, sigma=sigma, data_range=float(data_range), reduction="none", return_full_image=True
    )
    return full


def ssim_residual(
    x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, sigma: float = 1.5
) -> torch.Tensor:
    """The anomaly map 1 - SSIM, averaged over channels: [B, H, W], 0 where x and y agree."""
    return 1.0 - ssim_map(x, y, data_range, sigma).mean(1)


def ssim_loss(
    x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, sigma: float = 1.5
) -> torch.Tensor:
    """Differentiable training loss 1 - mean SSIM over the batch."""
    return ssim_residual(x, y, data_range, sigma).mean()
