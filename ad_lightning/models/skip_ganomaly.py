"""Skip-GANomaly (Akcay, Atapour-Abarghouei, Breckon; IJCNN 2019), the GANomaly paper's baseline.

The generator is a U-Net: an encoder down to 1x1 and a decoder back, each decoder level
concatenated with its mirrored encoder level, so normal images are reconstructed sharply.
A DCGAN discriminator D, trained with BCE, tells x from x_hat; its last convolutional
features f serve the generator's latent loss. The generator minimises

    w_adv * L_adv + w_con * L_con + w_lat * L_lat,

L_adv = BCE(D(x_hat), real) (the adversarial loss), L_con = || x - x_hat ||_1 and
L_lat = || f(x) - f(x_hat) ||_2^2. The anomaly score mixes the reconstruction error R(x)
and the discriminator-feature error L(x):

    A(x) = lambda * R(x) + (1 - lambda) * L(x),  lambda = 0.9.

The paper min-max scales A over the test set; here each part is instead divided by its mean
over the normal validation images, measured at test start for the weights being scored (kept
in the model file), so that lambda weighs comparable quantities without looking at test data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ad_lightning.checks import choice
from ad_lightning.models.base import Scores
from ad_lightning.models.families.gan import AdversarialReconstruction, mean_over_pixels
from ad_lightning.models.families.training_images import normal_images
from ad_lightning.nn.dcgan import DCGANDiscriminator, check_image_size
from ad_lightning.nn.unet import UNetGenerator
from ad_lightning.precision import scoring_context

SKIP_GANOMALY_SCORES = ("combined", "image_l1", "feature_l2")


class SkipGanomaly(AdversarialReconstruction):
    score_names = SKIP_GANOMALY_SCORES

    def __init__(
        self,
        image_size: int | Sequence[int],
        channels: int = 3,
        width: int = 64,
        max_width: int = 512,
        w_adv: float = 1.0,
        w_con: float = 40.0,
        w_lat: float = 1.0,
        lr: float = 2e-4,
        beta1: float = 0.5,
        beta2: float = 0.999,
        score_lambda: float = 0.9,
        score: str = "combined",
        reinit_d_below: float = 1e-5,
    ) -> None:
        choice("model.score", score, SKIP_GANOMALY_SCORES)
        if not 0.0 <= score_lambda <= 1.0:
            raise ValueError(f"model.score_lambda={score_lambda} must be in [0, 1]")
        size = check_image_size(image_size)
        super().__init__(
            UNetGenerator(image_size, channels, width, max_width),
            DCGANDiscriminator(image_size, channels, width),
            lr,
            beta1,
            beta2,
            reinit_d_below,
        )
        self.save_hyperparameters()
        self.image_size = size
        self.weights = {"adv": w_adv, "con": w_con, "lat": w_lat}
        self.score_lambda = score_lambda
        self.primary_score = score
        # mean R and L over the normal validation images: the scale of each part of A(x)
        self.register_buffer("part_scale", torch.ones(2))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.generator(x)

    def generator_loss(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        x_hat = self.generator(x)
        with torch.no_grad():
            _, f_real = self.discriminator(x)
        logit_fake, f_fake = self.discriminator(x_hat)
        parts = {
            "adv": F.binary_cross_entropy_with_logits(logit_fake, torch.ones_like(logit_fake)),
            "con": F.l1_loss(x_hat, x),
            "lat": F.mse_loss(f_fake, f_real),
        }
        loss = sum(self.weights[k] * v for k, v in parts.items())
        return loss, parts, x_hat

    def residuals(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(R(x) = mean |x - x_hat|, L(x) = mean (f(x) - f(x_hat))^2, x_hat): one G pass, one D pass."""
        x_hat = self.generator(x)
        _, features = self.discriminator(torch.cat([x, x_hat]))  # eval mode: no batch coupling
        f_x, f_hat = features.flatten(1).chunk(2)
        return mean_over_pixels((x - x_hat).abs()), (f_x - f_hat).pow(2).mean(1), x_hat

    def validation_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """L_con, for checkpoint selection."""
        x = batch["image"]
        return F.l1_loss(self.generator(x), x)

    # ---- the scale of R and L, on normal images ---------------------------------------
    @torch.no_grad()
    def on_test_start(self) -> None:
        """Mean R and L over the normal validation images (the training images without a
        validation split), for exactly the weights being scored: a checkpoint written
        mid-epoch (a step budget, an interrupt) holds weights newer than its last validation.
        Every DDP rank reads every image, so every rank holds the same scales."""
        sums = torch.zeros(3, dtype=torch.float64)
        with scoring_context(self):
            for batch in normal_images(self):
                rec, feat, _ = self.residuals(self._to_device(batch)["image"])
                sums += torch.tensor([rec.sum(), feat.sum(), len(rec)], dtype=torch.float64)
        if sums[2] > 0:
            self.part_scale.copy_((sums[:2] / sums[2]).clamp_min(1e-12).float())

    # ---- scoring ------------------------------------------------------------------
    def score(self, batch: dict[str, Any]) -> Scores:
        x = batch["image"]
        rec, feat, x_hat = self.residuals(x)
        lam = self.score_lambda
        combined = lam * rec / self.part_scale[0] + (1 - lam) * feat / self.part_scale[1]
        return Scores(
            image={"combined": combined, "image_l1": rec, "feature_l2": feat},
            map=(x - x_hat).abs().mean(1),
        )

    def describe(self) -> dict[str, Any]:
        return super().describe() | {
            "image_size": self.image_size,
            "loss_weights": self.weights,
            "score_lambda": self.score_lambda,
            "part_scale_from_validation": self.part_scale.tolist(),
        }
