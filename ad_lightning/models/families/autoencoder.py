"""The autoencoder family: image autoencoders trained by gradient on normal images.

DPAE and its baselines (AE, AE (SSIM), VAE) share DPAE's optimiser: SGD with momentum and a
weight decay scaled with the objective (`SGDAutoencoder`). CPCAE, trained with Adam, shares
only the family.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ad_lightning.models.base import AnomalyModule


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


class AutoencoderModule(AnomalyModule):
    """Family base: an image autoencoder trained by gradient on normal images."""

    family = "autoencoder"


class SGDAutoencoder(AutoencoderModule):
    """DPAE's optimiser, shared by DPAE and its baselines."""

    lr: float
    momentum: float
    weight_decay: float
    #: the paper's summed objective divided by this is what the training loss is. The AE
    #: baselines keep 1: their decay against a per-pixel mean loss is their own measured
    #: setting (experiments/dpae); DPAE's pixel_mean objective divides its decay (models/dpae.py).
    loss_divisor: float = 1.0

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return sgd_with_scaled_decay(
            self, self.lr, self.momentum, self.weight_decay, self.loss_divisor
        )
