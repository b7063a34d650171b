"""A global branch for logical anomalies (PUAD, arXiv 2402.15143): the Mahalanobis distance of
an image's pooled features, or of its pooled reconstruction residual, to the training images'.

A residual map's max sees what is locally wrong; a missing or extra part made of normal-looking
texture reconstructs well everywhere. Pooling the features over positions (mean and max)
keeps how much of each pattern the image holds, and one Gaussian over the training images'
pooled descriptors measures how far the whole image is from them.

Pooling the residual instead (its mean, the mean and the max of its magnitude, per channel)
keeps what a map's max loses: a faint deviation spread over a large area (magnetic tile's
uneven surfaces) or a pattern of channels that drift together, measured against how the
residual of a normal training image looks (experiments/skip_dfr/README.md, item 30).

The covariance is Ledoit-Wolf shrunk (2C dimensions from a few hundred images is
ill-conditioned) and fitted on descriptors standardised per dimension, so the shrinkage target
(a multiple of the identity) treats every dimension alike. Scoring is plain tensor algebra
(no sklearn), so the distance traces into the exported ONNX graph.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

from ad_lightning.precision import full_precision

#: floor of a descriptor dimension's training std (a constant dimension stays finite)
STD_FLOOR = 1e-6


#: what the global branch pools (`model.global_source`)
GLOBAL_SOURCES = ("features", "residual")


def global_descriptor(feats: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] features -> [B, 2C]: their mean and their max over positions."""
    return torch.cat([feats.mean((2, 3)), feats.amax((2, 3))], dim=1)


def residual_descriptor(residual: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] residual -> [B, 3C]: its mean, and its magnitude's mean and max, over
    positions (a signed offset, an area, a peak per channel)."""
    magnitude = residual.abs()
    return torch.cat([residual.mean((2, 3)), magnitude.mean((2, 3)), magnitude.amax((2, 3))], 1)


@torch.no_grad()
def fit_global_gaussian(
    descriptors: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean [D], std [D] (floored) and Ledoit-Wolf precision [D, D] of the standardised
    descriptors [N, D], all float32."""
    x = descriptors.double().cpu()
    mean = x.mean(0)
    std = x.std(0, unbiased=False).clamp_min(STD_FLOOR)
    z = ((x - mean) / std).numpy()
    precision = LedoitWolf().fit(z).precision_
    return mean.float(), std.float(), torch.from_numpy(np.asarray(precision)).float()


def global_distance(
    descriptors: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, precision: torch.Tensor
) -> torch.Tensor:
    """[B, D] descriptors -> [B] Mahalanobis distances sqrt(d^T P d), d = (x - mean) / std.

    In float32 with autocast off: a precision matrix's large eigenvalues turn bf16 products
    into distances off by percents (as PaDiM's, models/padim.py)."""
    with full_precision(descriptors.device):
        d = (descriptors.float() - mean.float()) / std.float()
        squared = ((d @ precision.float()) * d).sum(1)
    return squared.clamp_min(0).sqrt()
