"""DFR: Deep Feature Reconstruction (Shi et al. 2020), the baseline Skip-DFR improves on.

Same regional features as Skip-DFR (frozen CNN blocks, resized and concatenated), but the
autoencoder is a plain stack of 1x1 convolutions down to a small latent channel count and
back, with no skip connections. Same L2 loss, residual map and image scores. By default the
latent channel count follows the original's rule: the number of principal components that
explain 90 % of the variance of the training features.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ad_lightning.backbones.features import FeatureExtractor
from ad_lightning.models.families.feature_reconstruction import FeatureReconstructionModule
from ad_lightning.nn.pointwise_ae import PointwiseAutoencoder

log = logging.getLogger(__name__)


def pca_latent_channels(features: torch.Tensor, variance: float) -> int:
    """Smallest number of principal components of per-position feature vectors reaching `variance`."""
    vectors = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).double()
    vectors = vectors - vectors.mean(0)
    eigenvalues = (
        torch.linalg.eigvalsh(vectors.T @ vectors / max(len(vectors) - 1, 1)).flip(0).clamp(min=0)
    )
    explained = eigenvalues.cumsum(0) / eigenvalues.sum()
    return int((explained < variance).sum()) + 1


class DFR(FeatureReconstructionModule):
    def __init__(
        self,
        backbone: FeatureExtractor,
        lr: float = 1e-4,
        latent_channels: int | None = None,
        pca_variance: float = 0.9,
        pca_images: int = 64,
        score: str = "residual_max",
        distance: str = "l2",
        standardize: bool = False,
        sigma: float = 0.0,
        stats_images: int = 512,
        distance_norm: str = "mean",
        global_weight: float = 0.0,
        pixel_distance_norm: str | None = None,
        input_dropout: float = 0.0,
        pixel_distance: str | None = None,
        distance_combine: str = "sum",
        pixel_pool: int = 1,
        global_source: str = "features",
        global_images: int | None = None,
    ) -> None:
        autoencoder = (
            PointwiseAutoencoder(backbone.out_channels, latent_channels)
            if latent_channels
            else None
        )
        super().__init__(
            backbone,
            autoencoder,
            lr,
            score,
            distance,
            standardize,
            sigma,
            stats_images,
            distance_norm,
            global_weight,
            pixel_distance_norm,
            input_dropout,
            pixel_distance,
            distance_combine,
            pixel_pool,
            global_source,
            global_images,
        )
        self.save_hyperparameters(ignore=["backbone"])
        self.pca_variance = pca_variance
        self.pca_images = pca_images
        self.sized_by_pca = False  # the AE's latent size is this process's PCA's, not the config's

    def setup(self, stage: str) -> None:
        """Apply the PCA rule on training features before the optimiser is built. Only to
        train: a checkpoint or model file that is scored builds the AE at its stored size
        (`_load_from_state_dict`), which a PCA on unfitted statistics need not match."""
        super().setup(stage)
        if stage != "fit" or self.autoencoder is not None:
            return
        feats = self.training_features(self.pca_images)
        feats = self.standardised(feats)
        n = len(feats)
        latent = pca_latent_channels(feats, self.pca_variance)
        log.info(
            "DFR latent channels by PCA (%.0f%% variance of %d images): %d",
            100 * self.pca_variance,
            n,
            latent,
        )
        self.hparams.latent_channels = latent
        self.autoencoder = PointwiseAutoencoder(self.backbone.out_channels, latent).to(self.device)
        self.sized_by_pca = True

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        """A DFR built before its PCA (latent_channels=null) takes the fitted AE's size from the
        state dict it loads: a model file rebuilds the fitted architecture from the config as
        the run gave it. Its latent size is the narrowest 1x1 convolution's output. So does one
        sized by this process's PCA: a resumed fit runs the PCA again (Lightning calls setup
        before it restores the checkpoint), on features that may differ slightly (another
        feature store precision, another machine), and one channel more or less would refuse
        the checkpoint it resumes."""
        stored = [
            v
            for k, v in state_dict.items()
            if k.startswith(f"{prefix}autoencoder.") and k.endswith(".weight") and v.dim() == 4
        ]
        latent = min(int(w.shape[0]) for w in stored) if stored else None
        rebuild = self.autoencoder is None or (
            self.sized_by_pca and latent != self.hparams.latent_channels
        )
        if stored and rebuild:
            log.info("DFR latent channels from the loaded state: %d", latent)
            self.hparams.latent_channels = latent
            self.autoencoder = PointwiseAutoencoder(self.backbone.out_channels, latent).to(
                self.feature_mean.device
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"latent_channels": self.hparams.latent_channels}

    def fitted_config(self, config: dict[str, Any]) -> dict[str, Any]:
        return config | {"latent_channels": self.hparams.latent_channels}
