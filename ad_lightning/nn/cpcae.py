"""Conditional patch convolutional autoencoder (CPCAE) network of Saeedi & Giusti.

One autoencoder serves every patch position; the position is its *condition*. Encoder:
strided convolutions (Conv 4x4 / stride 2 + LeakyReLU) then a dense part that receives the
flattened maps concatenated with the condition. Bottleneck: a dense code (ReLU, so the L1
penalty on it makes it sparse). Decoder: a dense layer fed with [code, condition], reshaped
and upsampled by strided transposed convolutions. The dense bottleneck is the point of the
design: fully convolutional AEs learn to copy defects through.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ad_lightning.checks import choice

CONDITIONS = ("scalar", "onehot", "none")
OUTPUTS = ("sigmoid", "linear")


def encode_condition(position: torch.Tensor, num_patches: int, kind: str) -> torch.Tensor:
    """Patch index n (row-major) -> condition vector: n / (N - 1) as one scalar, or one-hot of N."""
    if kind == "scalar":
        return (position.float() / max(num_patches - 1, 1))[:, None]
    if kind == "onehot":
        return F.one_hot(position.long(), num_patches).float()
    if kind == "none":
        return position.new_zeros(len(position), 0, dtype=torch.float32)
    raise ValueError(f"model.condition={kind!r}: use one of {CONDITIONS}")


class ConditionalPatchAE(nn.Module):
    def __init__(
        self,
        patch_size: int,
        channels: int,
        num_patches: int,
        widths: Sequence[int] = (32, 64, 128),
        hidden: int = 512,
        code_size: int = 64,
        condition: str = "scalar",
        output: str = "sigmoid",
    ) -> None:
        super().__init__()
        widths = list(widths)
        choice("model.condition", condition, CONDITIONS)
        choice("model.output", output, OUTPUTS)
        if not widths or patch_size % 2 ** len(widths):
            raise ValueError(
                f"patch_size={patch_size} must be divisible by 2**len(widths) = {2 ** len(widths)}"
            )
        self.num_patches = num_patches
        self.condition = condition
        self.output = output
        cond = {"scalar": 1, "onehot": num_patches, "none": 0}[condition]
        self.bottom = patch_size // 2 ** len(widths)
        self.bottom_shape = (widths[-1], self.bottom, self.bottom)
        flat = widths[-1] * self.bottom**2

        convs: list[nn.Module] = []
        for c_in, c_out in zip([channels, *widths[:-1]], widths, strict=True):
            convs += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        self.encoder_conv = nn.Sequential(*convs)
        self.encoder_dense = nn.Sequential(
            nn.Linear(flat + cond, hidden),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(hidden, code_size),
            nn.ReLU(),
        )
        self.decoder_dense = nn.Sequential(
            nn.Linear(code_size + cond, hidden),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(hidden, flat),
            nn.LeakyReLU(0.2, inplace=True),
        )
        deconvs: list[nn.Module] = []
        ups = list(reversed(widths))
        for c_in, c_out in zip(ups[:-1], ups[1:], strict=True):
            deconvs += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        deconvs.append(nn.ConvTranspose2d(ups[-1], channels, 4, 2, 1))
        self.decoder_conv = nn.Sequential(*deconvs)

    def encode(self, patches: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.encoder_dense(torch.cat([self.encoder_conv(patches).flatten(1), cond], dim=1))

    def decode(self, code: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        maps = self.decoder_dense(torch.cat([code, cond], dim=1)).view(-1, *self.bottom_shape)
        out = self.decoder_conv(maps)
        return torch.sigmoid(out) if self.output == "sigmoid" else out

    def forward(
        self, patches: torch.Tensor, position: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Patches [M, C, p, p] at positions [M] -> (reconstruction [M, C, p, p], code [M, code_size])."""
        cond = encode_condition(position, self.num_patches, self.condition)
        code = self.encode(patches, cond)
        return self.decode(code, cond), code
