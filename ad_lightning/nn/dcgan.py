"""DCGAN building blocks (Radford et al. 2016), as GANomaly, Skip-GANomaly and AnoGAN use them.

The encoder halves the image with strided 4x4 convolutions (BatchNorm + LeakyReLU, none on
the first) down to a 4x4 map and turns that map into a vector with one last 4x4
convolution; the decoder mirrors it with transposed convolutions (BatchNorm + ReLU) and
ends in tanh, matching images normalised to [-1, 1] (`data.normalize: half`). The width
doubles each time the size halves, so one definition serves every square power-of-two
image size (16, 32, ..., 256) instead of one hand-written stack per size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def check_image_size(image_size: int | Sequence[int]) -> int:
    """The side of a square power-of-two image (>= 16); anything else cannot be halved to 4x4."""
    if isinstance(image_size, Sequence) and not isinstance(image_size, str):
        sides = {int(s) for s in image_size}
        if len(sides) != 1:
            raise ValueError(
                f"image_size={list(image_size)}: the DCGAN/U-Net stacks need square images; "
                "set data.image_size to one power of two (32, 64, 128 or 256)"
            )
        size = sides.pop()
    else:
        size = int(image_size)
    if size < 16 or size & (size - 1):
        raise ValueError(
            f"image_size={size}: the DCGAN/U-Net stacks halve the image down to 4x4 (1x1 for the "
            "U-Net), so it must be a power of two >= 16; use data.image_size=32, 64, 128 or 256"
        )
    return size


def init_dcgan_weights(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights ~ N(0, 0.02), BatchNorm scale ~ N(1, 0.02), bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class DCGANEncoder(nn.Module):
    """Image [B, C, S, S] -> vector [B, out_dim, 1, 1]; `features` is the 4x4 map before the head."""

    def __init__(
        self, image_size: int | Sequence[int], channels: int, out_dim: int, width: int = 64
    ) -> None:
        super().__init__()
        size = check_image_size(image_size)
        layers: list[nn.Module] = [
            nn.Conv2d(channels, width, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        c = width
        for _ in range(int(math.log2(size)) - 3):  # S/2 -> 4
            layers += [
                nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False),
                nn.BatchNorm2d(2 * c),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            c *= 2
        self.features = nn.Sequential(*layers)
        self.feature_channels = c
        self.head = nn.Conv2d(c, out_dim, 4, 1, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class DCGANDecoder(nn.Module):
    """Vector [B, in_dim, 1, 1] -> image [B, C, S, S] in [-1, 1] (tanh)."""

    def __init__(
        self, image_size: int | Sequence[int], channels: int, in_dim: int, width: int = 64
    ) -> None:
        super().__init__()
        size = check_image_size(image_size)
        n_up = int(math.log2(size)) - 3
        c = width * 2**n_up
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(in_dim, c, 4, 1, 0, bias=False),  # 1 -> 4
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
        ]
        for _ in range(n_up):  # 4 -> S/2
            layers += [
                nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(c // 2),
                nn.ReLU(inplace=True),
            ]
            c //= 2
        layers += [nn.ConvTranspose2d(c, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class DCGANDiscriminator(nn.Module):
    """Real/fake critic that also returns its features, for feature matching and residual scores.

    forward(x) -> (logit [B], features [B, C, 4, 4]); the logit goes to BCE-with-logits (stable
    where sigmoid + BCE saturates).
    """

    def __init__(self, image_size: int | Sequence[int], channels: int, width: int = 64) -> None:
        super().__init__()
        self.encoder = DCGANEncoder(image_size, channels, 1, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder.features(x)
        return self.encoder.head(features).flatten(), features
