"""PaDiM (Defard et al. 2021, "a Patch Distribution Modeling Framework").

Fit, one pass over the normal images (Sec. 3.2): at every position of the feature grid
(backbone blocks 1-3, resized to the first block's grid and concatenated), the normal
images' feature vectors are modelled by one multivariate Gaussian: a mean and a covariance
regularised by 0.01 * identity, which keeps it invertible when the training images are few.
A random subset of the channels (100 of them) is kept first: the paper finds it as good as
PCA, and the per-position covariance grows with the square of the dimension.

Scoring (Sec. 3.3): the Mahalanobis distance of a test feature to its position's Gaussian
is the anomaly score of that position; the map is upsampled bilinearly to the image and
smoothed with a Gaussian (sigma = 4 px), and the image score is the map's maximum.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ad_lightning.backbones.features import FeatureExtractor
from ad_lightning.checks import choice
from ad_lightning.models.base import Scores
from ad_lightning.models.families.statistics import ResizableBuffers, StatisticsModule
from ad_lightning.nn.smoothing import upsample_and_smooth
from ad_lightning.precision import full_precision

log = logging.getLogger(__name__)


def gaussian_per_position(
    embeddings: torch.Tensor, eps: float, chunk: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, D, P] embeddings -> mean [D, P] and inverse covariance [P, D, D].

    Covariance: unbiased, plus eps * I; computed and inverted in float64 (eigenvalues span
    eps to the features' variance) a chunk of positions at a time, to bound memory.
    """
    n, dim, positions = embeddings.shape
    if n < 2:
        log.warning("PaDiM: %d training image(s); each covariance is eps * I alone", n)
    mean = embeddings.double().mean(0)
    identity = torch.eye(dim, dtype=torch.float64, device=embeddings.device)
    inv_covariance = embeddings.new_empty(positions, dim, dim, dtype=torch.float32)
    for lo in range(0, positions, chunk):
        part = slice(lo, lo + chunk)
        centred = embeddings[:, :, part].double() - mean[:, part]
        covariance = torch.einsum("ndp,nep->pde", centred, centred) / max(n - 1, 1)
        inv_covariance[part] = torch.linalg.inv(covariance + eps * identity).float()
    return mean.float(), inv_covariance


def mahalanobis(
    embeddings: torch.Tensor, mean: torch.Tensor, inv_covariance: torch.Tensor
) -> torch.Tensor:
    """[B, D, P] embeddings -> [B, P] distances to each position's Gaussian.

    One batched matrix product over positions ([P, B, D] x [P, D, D]): a plain MatMul that
    PyTorch and onnxruntime both run fast, where an einsum became a slow ONNX Einsum.
    In float32 under mixed precision too: an inverse covariance has eigenvalues up to 1/eps,
    which bf16's 8-bit mantissa (autocast runs bmm in it) turns into distances off by percents."""
    with full_precision(embeddings.device):
        delta = (embeddings.float() - mean.float()).permute(2, 0, 1)  # [P, B, D]
        squared = (torch.bmm(delta, inv_covariance.float()) * delta).sum(-1)  # [P, B]
    return squared.T.clamp_min(0).sqrt()


class PaDiM(StatisticsModule, ResizableBuffers):
    """One Gaussian per feature position; score = Mahalanobis distance."""

    score_names = ("max",)

    def __init__(
        self,
        backbone: FeatureExtractor,
        n_features: int = 100,
        eps: float = 0.01,
        sigma: float = 4.0,
        score: str = "max",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.primary_score = choice("model.score", score, self.score_names)
        if not 1 <= n_features <= backbone.out_channels:
            raise ValueError(
                f"model.n_features={n_features}: backbone {backbone.alias} blocks {backbone.blocks} give {backbone.out_channels} channels; choose 1..{backbone.out_channels}"
            )
        if eps <= 0:
            raise ValueError(f"model.eps={eps} must be > 0: it keeps each covariance invertible")
        self.backbone = backbone
        self.n_features = n_features
        self.eps = eps
        self.sigma = sigma
        generator = torch.Generator().manual_seed(seed)
        channels = torch.randperm(backbone.out_channels, generator=generator)[:n_features]
        self.register_buffer("channel_index", channels.sort().values)
        self.register_buffer("mean", torch.empty(0, 0))  # [D, h*w]
        self.register_buffer("inv_covariance", torch.empty(0, 0, 0))  # [h*w, D, D]

    def describe(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone.describe(),
            "n_features": self.n_features,
            "eps": self.eps,
            "n_positions": self.mean.shape[1] if self.mean.numel() else 0,
        }

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, D, h, w]: the chosen random channels of the concatenated blocks."""
        return self.backbone(images).float()[:, self.channel_index]

    def collect(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.embed(batch["image"]).flatten(2)

    def finalise(self, rows: torch.Tensor) -> None:
        self.mean, self.inv_covariance = gaussian_per_position(rows.float(), self.eps)
        log.info(
            "PaDiM: Gaussians of %d dims at %d positions from %d images",
            *self.mean.shape,
            len(rows),
        )

    def score(self, batch: dict[str, Any]) -> Scores:
        if self.mean.numel() == 0:
            raise RuntimeError("PaDiM is not fitted: run trainer.fit first")
        images = batch["image"]
        embeddings = self.embed(images)
        b, d, h, w = embeddings.shape
        if (d, h * w) != tuple(self.mean.shape):
            raise ValueError(
                f"PaDiM: a {h}x{w} feature grid ({tuple(images.shape[-2:])} px images) but the Gaussians were fitted on {self.mean.shape[1]} positions; score at the training image size"
            )
        distances = mahalanobis(embeddings.flatten(2), self.mean, self.inv_covariance)
        anomaly_map = upsample_and_smooth(
            distances.view(b, h, w), tuple(images.shape[-2:]), self.sigma
        )
        return Scores(image={"max": anomaly_map.flatten(1).amax(1)}, map=anomaly_map)
