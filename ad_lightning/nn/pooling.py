"""Pooling heads that turn a CNN feature map into one embedding vector.

Saeedi & Giusti embed an anomaly map with an ImageNet CNN cut before its global pooling
and replace that pooling by a head that concatenates parallel and cascaded poolings,
giving 3x the features of plain global max pooling. The paper does not spell out the
cascade; ours (documented choice):

- parallel: global max pooling and global average pooling of the feature map (2C);
- cascaded: a local max pooling (kernel = stride = `cascade_kernel`, ceil mode, so maps
  smaller than the kernel still pool) followed by global average pooling (C).

Max keeps the strongest response (a small defect), average the overall level, and the
cascade the average of the local peaks, which sits between the two on maps with several
peaks. Output: [B, 3C].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def global_max_pool(features: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, C]: the deep-feature baseline's embedding."""
    return features.flatten(2).amax(2)


class ParallelCascadedPooling(nn.Module):
    """[B, C, h, w] -> [B, 3C] = [global max | global avg | global avg(local max pool)]."""

    expansion = 3

    def __init__(self, cascade_kernel: int = 2) -> None:
        super().__init__()
        if cascade_kernel < 1:
            raise ValueError(f"cascade_kernel={cascade_kernel} must be >= 1")
        self.cascade_kernel = cascade_kernel

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        flat = features.flatten(2)
        local_max = F.max_pool2d(features, self.cascade_kernel, self.cascade_kernel, ceil_mode=True)
        return torch.cat([flat.amax(2), flat.mean(2), local_max.flatten(2).mean(2)], dim=1)
