"""Shared by Skip-DFR and DFR: reconstruct frozen deep features, score by the residual.

FE(x) is the concatenation of the chosen backbone blocks; an autoencoder AE learns
AE(FE(x)) ~ FE(x) on normal images with an L2 loss. The residual map is the per-position
L2 norm over channels of AE(FE(x)) - FE(x), upsampled to the image; image scores reduce it.
Because FE is frozen, its features are cached after the first epoch when training uses no
random augmentation, so later epochs never re-run the backbone.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ad_lightning.backbones.features import FeatureExtractor
from ad_lightning.checks import choice
from ad_lightning.models.base import AnomalyModule, Scores

log = logging.getLogger(__name__)


def reduce_map(residual: torch.Tensor, how: str) -> torch.Tensor:
    """Image score from a residual map [B, H, W]: max, mean, or mean of the top 1 % positions."""
    flat = residual.flatten(1)
    if how == "max":
        return flat.amax(1)
    if how == "mean":
        return flat.mean(1)
    if how == "top1pct":
        k = max(1, flat.shape[1] // 100)
        return flat.topk(k, dim=1).values.mean(1)
    raise ValueError(f"unknown score reduction {how!r}; use max, mean or top1pct")


SCORE_REDUCTIONS = ("max", "mean", "top1pct")


class FeatureReconstructionModule(AnomalyModule):
    def __init__(
        self,
        backbone: FeatureExtractor,
        autoencoder: nn.Module | None,
        lr: float,
        score: str = "residual_max",
        cache_features: bool = True,
        cache_max_gb: float = 8.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.autoencoder = autoencoder
        self.lr = lr
        self.primary_score = choice(
            "model.score", score, [f"residual_{r}" for r in SCORE_REDUCTIONS]
        )
        self.cache_features = cache_features
        self.cache_max_bytes = int(cache_max_gb * 2**30)
        self._cache: dict[int, torch.Tensor] = {}
        self._cache_bytes = 0
        self._cache_on = False
        self.strict_loading = False  # checkpoints hold no backbone weights

    def describe(self) -> dict[str, Any]:
        return {"backbone": self.backbone.describe(), "feature_cache": self._cache_on}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.autoencoder.parameters(), lr=self.lr)

    def on_fit_start(self) -> None:
        augmenting = getattr(self.trainer.datamodule, "has_random_augmentation", True)
        self._cache_on = self.cache_features and not augmenting
        self._cache, self._cache_bytes = {}, 0
        if self.cache_features and augmenting:
            log.info(
                "feature cache off: random train augmentations change the features every epoch"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The frozen backbone is rebuilt from its config; keeping it out saves disk (340 MB for ResNeXt101)."""
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("backbone.")
        }

    def on_fit_end(self) -> None:
        self._cache, self._cache_bytes = {}, 0

    def features(self, batch: dict[str, Any]) -> torch.Tensor:
        """FE(x), from the cache when every image of the batch is in it."""
        if not (self._cache_on and self.training):
            return self.backbone(batch["image"])
        keys = [int(i) for i in batch["index"]]
        if all(k in self._cache for k in keys):
            return torch.stack([self._cache[k] for k in keys]).to(self.device)
        feats = self.backbone(batch["image"])
        size = feats[0].numel() * feats[0].element_size()
        for k, f in zip(keys, feats, strict=False):
            if k not in self._cache and self._cache_bytes + size <= self.cache_max_bytes:
                self._cache[k] = f.detach().cpu()
                self._cache_bytes += size
        return feats

    def reconstruction_loss(self, feats: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.autoencoder(feats), feats)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.check_finite(self.reconstruction_loss(self.features(batch)))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    def validation_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.reconstruction_loss(self.backbone(batch["image"]))

    def score(self, batch: dict[str, Any]) -> Scores:
        feats = self.backbone(batch["image"])
        residual = (self.autoencoder(feats) - feats).pow(2).sum(1).sqrt()
        anomaly_map = F.interpolate(
            residual[:, None], size=batch["image"].shape[-2:], mode="bilinear", align_corners=False
        )[:, 0]
        image = {f"residual_{how}": reduce_map(residual, how) for how in SCORE_REDUCTIONS}
        return Scores(image=image, map=anomaly_map)
