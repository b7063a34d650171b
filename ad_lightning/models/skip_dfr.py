"""Skip-DFR (Tang, Hsu, Huang, Li; Sensors 2022).

A frozen ImageNet CNN gives regional features from blocks 1-3, resized and concatenated
(FE(x)); a convolutional autoencoder with U-Net skip connections reconstructs them under
an L2 "contextual" loss. The residual map between AE(FE(x)) and FE(x), upsampled to the
image, is the heat map; its maximum is the image score.

The paper gives no AE widths. Ours follow the input: level l has `width_ratio * C / 2**l`
channels for C input channels, so the AE costs a fixed share of the backbone's FLOPs
whatever the backbone (`widths` sets them explicitly instead).
"""

from __future__ import annotations

from collections.abc import Sequence

from ad_lightning.backbones.features import FeatureExtractor
from ad_lightning.models.families.feature_reconstruction import FeatureReconstructionModule
from ad_lightning.nn.skip_ae import SkipAutoencoder


def widths_for(in_channels: int, ratio: float, levels: int) -> list[int]:
    """Encoder widths sized to the input: ratio * C at the first level, halving per level."""
    if ratio <= 0:
        raise ValueError(f"model.width_ratio={ratio} must be > 0")
    return [max(8, int(round(ratio * in_channels / 2**level / 8)) * 8) for level in range(levels)]


class SkipDFR(FeatureReconstructionModule):
    def __init__(
        self,
        backbone: FeatureExtractor,
        lr: float = 1e-3,
        widths: Sequence[int] | None = None,
        width_ratio: float = 0.5,
        levels: int = 3,
        skips: str = "partial",
        score: str = "residual_max",
        distance: str = "combined",
        standardize: bool = True,
        sigma: float = 4.0,
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
        widths = list(widths) if widths else widths_for(backbone.out_channels, width_ratio, levels)
        autoencoder = SkipAutoencoder(backbone.out_channels, widths, skips)
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
        self.skips = skips
        self.widths = widths

    def describe(self) -> dict:
        return super().describe() | {"skips": self.skips, "widths": self.widths}
