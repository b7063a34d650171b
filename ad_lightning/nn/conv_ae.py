"""A convolutional autoencoder with a dense bottleneck: DPAE's encoder/decoder, reused by the
AE (L2), AE (SSIM) and VAE baselines so that every method of DPAE's Table 4 compares losses
and scores on one network.

Encoder: strided Conv(4, stride 2) + BatchNorm + LeakyReLU per level, then flatten and a
fully connected layer (+ BatchNorm) to a vector. Decoder: fully connected + BatchNorm back
to the deepest feature map, then one ConvTranspose(4, stride 2) + BatchNorm + LeakyReLU per
level mirroring the encoder; the last level maps to image channels with no normalisation,
through the output activation. DPAE's 224 px network is widths (128, 256, d, d, d), so the
decoder's transposed convolutions output d, d, 256, 128, 3 channels and the deepest map is
7x7; any image size divisible by 2**len(widths) works the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ad_lightning.checks import choice

OUTPUT_ACTIVATIONS = ("sigmoid", "tanh", "none")


def paper_widths(latent_dim: int) -> list[int]:
    """DPAE's encoder channels: 128, 256, then the latent size d for the three deepest levels."""
    return [128, 256, latent_dim, latent_dim, latent_dim]


def bottleneck_size(image_size: int | Sequence[int], levels: int) -> tuple[int, int]:
    """Spatial size of the deepest map; every level halves it, so it must divide evenly."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    step = 2**levels
    if h % step or w % step:
        raise ValueError(
            f"image size {h}x{w} is not divisible by 2**{levels} = {step} "
            f"({levels} stride-2 levels); use e.g. data.image_size={max(step, h // step * step)} "
            "or fewer model.widths"
        )
    return h // step, w // step


def down(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)
    )


def up(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(0.2),
    )


class ConvEncoder(nn.Module):
    """Image [B, C, H, W] -> vector [B, out_features].

    `latent_norm` puts BatchNorm on the vector (DPAE's "fully connected + BN"); a VAE turns it
    off because its vector holds mean and log-variance, which must not be standardised.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int | Sequence[int],
        widths: Sequence[int],
        out_features: int,
        latent_norm: bool = True,
    ) -> None:
        super().__init__()
        widths = list(widths)
        if not widths:
            raise ValueError("model.widths needs at least one level")
        h, w = bottleneck_size(image_size, len(widths))
        self.convs = nn.Sequential(
            *(down(a, b) for a, b in zip([in_channels, *widths[:-1]], widths, strict=True))
        )
        self.fc = nn.Linear(widths[-1] * h * w, out_features, bias=not latent_norm)
        self.norm = nn.BatchNorm1d(out_features) if latent_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(self.convs(x).flatten(1)))


class ConvDecoder(nn.Module):
    """Vector [B, latent_dim] -> image [B, out_channels, H, W], mirroring a ConvEncoder."""

    def __init__(
        self,
        latent_dim: int,
        image_size: int | Sequence[int],
        widths: Sequence[int],
        out_channels: int,
        output_activation: str = "sigmoid",
    ) -> None:
        super().__init__()
        choice("model.output_activation", output_activation, OUTPUT_ACTIVATIONS)
        widths = list(widths)
        self.shape = (widths[-1], *bottleneck_size(image_size, len(widths)))
        n = self.shape[0] * self.shape[1] * self.shape[2]
        self.fc = nn.Sequential(nn.Linear(latent_dim, n, bias=False), nn.BatchNorm1d(n))
        rev = widths[::-1]  # e.g. d, d, d, 256, 128
        self.convs = nn.Sequential(*(up(a, b) for a, b in zip(rev[:-1], rev[1:], strict=True)))
        self.out = nn.ConvTranspose2d(rev[-1], out_channels, 4, 2, 1)
        self.act = {"sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(), "none": nn.Identity()}[
            output_activation
        ]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(-1, *self.shape)
        return self.act(self.out(self.convs(h)))


class ConvAutoencoder(nn.Module):
    """Encoder + decoder; `forward` returns (z, x_hat)."""

    def __init__(
        self,
        in_channels: int,
        image_size: int | Sequence[int],
        latent_dim: int,
        widths: Sequence[int] | None = None,
        output_activation: str = "sigmoid",
    ) -> None:
        super().__init__()
        widths = list(widths) if widths else paper_widths(latent_dim)
        self.latent_dim = latent_dim
        self.widths = widths
        self.encoder = ConvEncoder(in_channels, image_size, widths, latent_dim)
        self.decoder = ConvDecoder(latent_dim, image_size, widths, in_channels, output_activation)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return z, self.decoder(z)
