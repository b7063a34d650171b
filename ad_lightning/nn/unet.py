"""The U-Net generator of Skip-GANomaly (Akcay et al. 2019), after pix2pix (Isola et al. 2017).

The encoder halves the image with strided 4x4 convolutions (BatchNorm + LeakyReLU; none on
the first level and on the 1x1 bottleneck) all the way down to 1x1; the decoder doubles it
back with transposed convolutions (BatchNorm + ReLU) and concatenates each level with its
mirrored encoder level. Those skips carry the detail a bottleneck alone loses, so normal
images are reconstructed sharply; the input image itself is never skipped to the output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ad_lightning.nn.dcgan import check_image_size


class UNetGenerator(nn.Module):
    """x [B, C, S, S] -> x_hat [B, C, S, S] in [-1, 1]; S a power of two >= 16."""

    def __init__(
        self,
        image_size: int | Sequence[int],
        channels: int = 3,
        width: int = 64,
        max_width: int = 512,
    ) -> None:
        super().__init__()
        depth = int(math.log2(check_image_size(image_size)))  # S -> 1 in `depth` halvings
        widths = [min(width * 2**i, max_width) for i in range(depth)]
        self.encoder = nn.ModuleList()
        c_in = channels
        for level, c in enumerate(widths):
            layers: list[nn.Module] = [nn.Conv2d(c_in, c, 4, 2, 1, bias=False)]
            if 0 < level < depth - 1:
                layers.append(nn.BatchNorm2d(c))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            self.encoder.append(nn.Sequential(*layers))
            c_in = c
        # decoder level l rebuilds encoder level l-1 from level l (plus l's skip, except at 1x1)
        self.decoder = nn.ModuleList()
        for level in range(depth - 1, 0, -1):
            c_in = widths[level] * (1 if level == depth - 1 else 2)
            self.decoder.append(
                nn.Sequential(
                    nn.ConvTranspose2d(c_in, widths[level - 1], 4, 2, 1, bias=False),
                    nn.BatchNorm2d(widths[level - 1]),
                    nn.ReLU(inplace=True),
                )
            )
        self.head = nn.Sequential(nn.ConvTranspose2d(2 * widths[0], channels, 4, 2, 1), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = []
        h = x
        for block in self.encoder:
            h = block(h)
            levels.append(h)
        for block, skip in zip(self.decoder, reversed(levels[:-1]), strict=True):
            h = torch.cat([block(h), skip], dim=1)
        return self.head(h)
