"""Convolutional autoencoders over feature maps: the skip-connected one of Skip-DFR.

Encoder: Conv(4, stride 2) + BatchNorm + LeakyReLU per level; decoder: ConvTranspose(4,
stride 2) + BatchNorm + ReLU, concatenating the mirrored encoder level (U-Net style, as in
Skip-GANomaly). The input itself is never skipped to the output, which would let the AE
copy defects through; `skips` chooses which inner levels are connected (all, partial =
the deepest only, none) for the ablation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ad_lightning.checks import choice

SKIP_MODES = ("all", "partial", "none")


def down(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(0.2, inplace=True),
    )


def up(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SkipAutoencoder(nn.Module):
    def __init__(
        self, in_channels: int, widths: Sequence[int] = (256, 128, 64), skips: str = "all"
    ) -> None:
        super().__init__()
        choice("model.skips", skips, SKIP_MODES)
        widths = list(widths)
        depth = len(widths)
        if depth < 1:
            raise ValueError("model.widths needs at least one level")
        # Encoder levels e_1..e_L; the decoder rebuilds e_{L-1}..e_1 and then the input size.
        self.encoder = nn.ModuleList(
            down(c_in, c_out)
            for c_in, c_out in zip([in_channels, *widths[:-1]], widths, strict=False)
        )
        inner = list(range(depth - 2, -1, -1))  # encoder levels that can feed a skip, deepest first
        self.skip_levels = set(inner if skips == "all" else inner[:1] if skips == "partial" else [])
        self.decoder = nn.ModuleList()
        c = widths[-1]
        for level in inner:
            self.decoder.append(up(c, widths[level]))
            c = widths[level] * (2 if level in self.skip_levels else 1)
        self.final_up = up(c, widths[0])
        self.head = nn.Conv2d(widths[0], in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = []
        h = x
        for block in self.encoder:
            h = block(h)
            levels.append(h)
        for block, level in zip(self.decoder, range(len(levels) - 2, -1, -1), strict=False):
            h = block(h)
            target = levels[level]
            if h.shape[-2:] != target.shape[-2:]:
                h = F.interpolate(h, size=target.shape[-2:], mode="bilinear", align_corners=False)
            if level in self.skip_levels:
                h = torch.cat([h, target], dim=1)
        h = self.final_up(h)
        if h.shape[-2:] != x.shape[-2:]:
            h = F.interpolate(h, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(h)
