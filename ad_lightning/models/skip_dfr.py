"""Skip-DFR (Tang, Hsu, Huang, Li; Sensors 2022).

A frozen ImageNet CNN gives regional features from blocks 1-3, resized and concatenated
(FE(x)); a convolutional autoencoder with U-Net skip connections reconstructs them under
an L2 "contextual" loss. The residual map ||AE(FE(x)) - FE(x)||_2 over channels,
upsampled to the image, is the heat map; its maximum is the image score.
"""

from __future__ import annotations

from collections.abc import Sequence

from ad_lightning.backbones.features import FeatureExtractor
from ad_lightning.models.feature_reconstruction import FeatureReconstructionModule
from ad_lightning.nn.skip_ae import SkipAutoencoder


class SkipDFR(FeatureReconstructionModule):
    def __init__(
        self,
        backbone: FeatureExtractor,
        lr: float = 1e-4,
        widths: Sequence[int] = (256, 128, 64),
        skips: str = "all",
        score: str = "residual_max",
        cache_features: bool = True,
        cache_max_gb: float = 8.0,
    ) -> None:
        autoencoder = SkipAutoencoder(backbone.out_channels, widths, skips)
        super().__init__(backbone, autoencoder, lr, score, cache_features, cache_max_gb)
        self.save_hyperparameters(ignore=["backbone"])
        self.skips = skips

    def describe(self) -> dict:
        return super().describe() | {"skips": self.skips}
