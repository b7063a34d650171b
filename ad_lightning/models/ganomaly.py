"""GANomaly in industry (Tang, Kuo, Lan, Ding, Hsu, Young), on GANomaly (Akcay et al. 2018).

The generator is an encoder-decoder-encoder: GE maps the image x to a latent z, GD
reconstructs x_hat from z, and a second encoder E maps x_hat to z_hat. A DCGAN
discriminator D learns, with binary cross-entropy, to tell x from x_hat. The generator
minimises

    w_adv * L_adv + w_con * L_con + w_lat * L_lat,

L_adv = || f(x) - f(x_hat) ||_2^2 (feature matching on D's features f, not on D's verdict),
L_con = || x - x_hat ||_1 and L_lat = || z - z_hat ||_2^2. Trained on normal images only, it
reconstructs normal images well and anomalous ones badly.

The paper's contribution is the residual used as anomaly score. One forward pass gives all:
`feature_l1` and `feature_l2` (L1 / L2 between D's features of x and of x_hat), `image_l1`
(L1 between x and x_hat) and classic GANomaly's `latent_l2` (|| z - z_hat ||^2). The paper
finds image_l1 best on objects and feature_l1 best on textures. The anomaly map is the
per-pixel | x - x_hat |, averaged over channels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ad_lightning.checks import choice
from ad_lightning.models.base import Scores
from ad_lightning.models.families.gan import AdversarialReconstruction, mean_over_pixels
from ad_lightning.nn.dcgan import DCGANDecoder, DCGANDiscriminator, DCGANEncoder, check_image_size

log = logging.getLogger(__name__)


class GanomalyGenerator(nn.Module):
    """GE -> z -> GD -> x_hat -> E -> z_hat."""

    def __init__(
        self, image_size: int | Sequence[int], channels: int, latent_dim: int, width: int
    ) -> None:
        super().__init__()
        self.encoder1 = DCGANEncoder(image_size, channels, latent_dim, width)  # GE
        self.decoder = DCGANDecoder(image_size, channels, latent_dim, width)  # GD
        self.encoder2 = DCGANEncoder(image_size, channels, latent_dim, width)  # E

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_hat, z, z_hat)."""
        z = self.encoder1(x)
        x_hat = self.decoder(z)
        return x_hat, z, self.encoder2(x_hat)


GANOMALY_SCORES = ("image_l1", "feature_l1", "feature_l2", "latent_l2")


class Ganomaly(AdversarialReconstruction):
    score_names = GANOMALY_SCORES

    def __init__(
        self,
        image_size: int | Sequence[int],
        channels: int = 3,
        latent_dim: int = 100,
        width: int = 64,
        w_adv: float = 20.0,
        w_con: float = 1.0,
        w_lat: float = 1.0,
        lr: float = 1e-3,
        beta1: float = 0.5,
        beta2: float = 0.999,
        score: str = "image_l1",
        reinit_d_below: float = 1e-5,
    ) -> None:
        choice("model.score", score, GANOMALY_SCORES)
        size = check_image_size(image_size)
        super().__init__(
            GanomalyGenerator(image_size, channels, latent_dim, width),
            DCGANDiscriminator(image_size, channels, width),
            lr,
            beta1,
            beta2,
            reinit_d_below,
        )
        self.save_hyperparameters()
        self.image_size = size
        self.weights = {"adv": w_adv, "con": w_con, "lat": w_lat}
        self.primary_score = score

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.generator(x)[0]

    def generator_loss(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        x_hat, z, z_hat = self.generator(x)
        with torch.no_grad():
            _, f_real = self.discriminator(x)
        _, f_fake = self.discriminator(x_hat)
        parts = {
            "adv": F.mse_loss(f_fake, f_real),  # feature matching
            "con": F.l1_loss(x_hat, x),
            "lat": F.mse_loss(z_hat, z),
        }
        loss = sum(self.weights[k] * v for k, v in parts.items())
        return loss, parts, x_hat

    def residuals(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Every residual score from one generator pass and one discriminator pass over [x; x_hat].

        Distances are per-element means (the L1 / squared-L2 distances divided by the
        dimension, as GANomaly's code computes them): same ranking, comparable across sizes.
        """
        x_hat, z, z_hat = self.generator(x)
        _, features = self.discriminator(torch.cat([x, x_hat]))  # eval mode: no batch coupling
        f_x, f_hat = features.flatten(1).chunk(2)
        scores = {
            "image_l1": mean_over_pixels((x - x_hat).abs()),
            "feature_l1": (f_x - f_hat).abs().mean(1),
            "feature_l2": (f_x - f_hat).pow(2).mean(1),
            "latent_l2": mean_over_pixels((z - z_hat).pow(2)),
        }
        return scores, x_hat

    def score(self, batch: dict[str, Any]) -> Scores:
        x = batch["image"]
        scores, x_hat = self.residuals(x)
        return Scores(image=scores, map=(x - x_hat).abs().mean(1))

    def describe(self) -> dict[str, Any]:
        return super().describe() | {
            "image_size": self.image_size,
            "latent_dim": self.hparams.latent_dim,
            "loss_weights": self.weights,
        }
