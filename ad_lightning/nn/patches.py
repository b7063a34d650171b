"""Overlapping patches: cut an image into a grid of patches and put them back.

CPCAE reconstructs an image patch by patch; the reassembled reconstruction averages the
overlapping parts so every pixel is the mean of all patches that cover it. When the patch
grid does not end exactly on the image border, the image is padded (replicate) on the
bottom/right so every pixel is covered, and the padding is cropped off after reassembly.
Both directions use torch unfold/fold, so they are exact inverses up to the averaging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PatchGrid:
    """Where the patches of an H x W image lie: `rows` x `cols` patches of `size`, every `stride`."""

    height: int
    width: int
    size: int
    stride: int

    def __post_init__(self) -> None:
        if self.size < 1 or self.stride < 1:
            raise ValueError(f"patch size {self.size} and stride {self.stride} must be >= 1")
        if self.stride > self.size:
            raise ValueError(
                f"patch stride {self.stride} > patch size {self.size} would leave pixels uncovered"
            )
        if self.size > min(self.height, self.width):
            raise ValueError(
                f"patch size {self.size} exceeds the image ({self.height}x{self.width})"
            )

    def _count(self, length: int) -> int:
        return -(-(length - self.size) // self.stride) + 1  # ceil: the last patch may need padding

    @property
    def rows(self) -> int:
        return self._count(self.height)

    @property
    def cols(self) -> int:
        return self._count(self.width)

    @property
    def num_patches(self) -> int:
        return self.rows * self.cols

    @property
    def padded(self) -> tuple[int, int]:
        """Image size after padding so the last row/column of patches ends on the border."""
        return (self.rows - 1) * self.stride + self.size, (self.cols - 1) * self.stride + self.size


def extract_patches(images: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, C, p, p], patches in row-major order (index n = row * cols + col)."""
    b, c, h, w = images.shape
    if (h, w) != (grid.height, grid.width):
        raise ValueError(f"images are {h}x{w} but the patch grid is for {grid.height}x{grid.width}")
    ph, pw = grid.padded
    if (ph, pw) != (h, w):
        images = F.pad(images, (0, pw - w, 0, ph - h), mode="replicate")
    cols = F.unfold(images, kernel_size=grid.size, stride=grid.stride)  # [B, C*p*p, N]
    return cols.transpose(1, 2).reshape(b, grid.num_patches, c, grid.size, grid.size)


def assemble_patches(patches: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """[B, N, C, p, p] -> [B, C, H, W]; each pixel is the mean of the patches that cover it."""
    b, n, c, p, _ = patches.shape
    if n != grid.num_patches or p != grid.size:
        raise ValueError(
            f"got {n} patches of {p} px; the grid has {grid.num_patches} of {grid.size} px"
        )
    cols = patches.reshape(b, n, c * p * p).transpose(1, 2)
    summed = F.fold(cols, output_size=grid.padded, kernel_size=p, stride=grid.stride)
    ones = torch.ones(1, p * p, n, dtype=patches.dtype, device=patches.device)
    coverage = F.fold(ones, output_size=grid.padded, kernel_size=p, stride=grid.stride)
    return (summed / coverage)[..., : grid.height, : grid.width]
