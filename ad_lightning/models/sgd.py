"""SGD as DPAE and its baselines train: weight decay scaled with the objective."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def pixel_values(channels: int, image_size: int | Sequence[int]) -> int:
    """C * H * W of an input image."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return int(channels * h * w)


def sgd_with_scaled_decay(
    module: nn.Module, lr: float, momentum: float, weight_decay: float, loss_divisor: float
) -> torch.optim.SGD:
    """SGD for an objective divided by `loss_divisor` relative to the paper's summed one.

    Weight decay adds `weight_decay * w` to the gradient whatever the loss's scale; dividing
    the loss by C*H*W but not the decay made the decay ~150,000x stronger relative to the
    data term than in the paper (224 px). Dividing the decay by the same number keeps the
    paper's minimiser: the scaled objective is then exactly the paper's divided by a constant.
    """
    return torch.optim.SGD(
        module.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay / loss_divisor
    )
