"""DFR's autoencoder: a stack of 1x1 convolutions (BN + ReLU), no skips, no spatial mixing.

Channels follow the original DFR design: C -> (C + 2c)/2 -> 2c -> c (latent) and back,
where c is the latent channel count.
"""

from __future__ import annotations

from torch import nn


def _pointwise(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class PointwiseAutoencoder(nn.Sequential):
    def __init__(self, in_channels: int, latent_channels: int) -> None:
        mid = (in_channels + 2 * latent_channels) // 2
        widths = [in_channels, mid, 2 * latent_channels, latent_channels, 2 * latent_channels, mid]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            layers += _pointwise(c_in, c_out)
        layers.append(nn.Conv2d(mid, in_channels, 1))
        super().__init__(*layers)
