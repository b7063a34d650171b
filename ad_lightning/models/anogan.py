"""AnoGAN (Schlegl et al. 2017), the slow baseline of the GANomaly-in-industry paper.

A DCGAN (generator G from a latent z, discriminator D) is trained on normal images only, so
G spans the manifold of normal appearance. At test time there is no encoder: for each image
x a latent z is found by gradient descent, `latent_steps` steps from a random start, on

    loss(z) = (1 - lambda) * R(z) + lambda * D(z),   lambda = 0.1,

R(z) = | x - G(z) | (the residual loss) and D(z) = | f(x) - f(G(z)) | (the discrimination
loss, matching D's intermediate features f). The loss at the final z is the anomaly score;
its parts are reported too, and | x - G(z) | is the anomaly map. Hundreds of backward passes
per image make it slow by design (7 s / image in the paper's Table 4).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ad_lightning.checks import choice
from ad_lightning.models.base import Scores
from ad_lightning.models.families.gan import GANModule
from ad_lightning.nn.dcgan import (
    DCGANDecoder,
    DCGANDiscriminator,
    check_image_size,
    init_dcgan_weights,
)
from ad_lightning.nn.noise import image_seeds, per_image_normal

log = logging.getLogger(__name__)
ANOGAN_SCORES = ("anogan", "residual", "discrimination")


class AnoGAN(GANModule):
    score_names = ANOGAN_SCORES
    #: the latent search needs autograd at test time
    score_needs_grad = True
    export_blocker = "its score searches a latent vector by gradient steps on each test image; an ONNX graph holds one forward pass"

    def __init__(
        self,
        image_size: int | Sequence[int],
        channels: int = 3,
        latent_dim: int = 100,
        width: int = 64,
        lr: float = 2e-4,
        beta1: float = 0.5,
        beta2: float = 0.999,
        latent_steps: int = 500,
        latent_lr: float = 0.05,
        score_lambda: float = 0.1,
        latent_seed: int = 0,
        score: str = "anogan",
    ) -> None:
        super().__init__(lr, beta1, beta2)
        if latent_steps < 0:
            raise ValueError(f"model.latent_steps={latent_steps} must be >= 0")
        self.image_size = check_image_size(image_size)
        self.save_hyperparameters()
        self.generator = DCGANDecoder(image_size, channels, latent_dim, width)
        self.discriminator = DCGANDiscriminator(image_size, channels, width)
        init_dcgan_weights(self)
        self.latent_dim = latent_dim
        self.latent_steps = latent_steps
        self.latent_lr = latent_lr
        self.score_lambda = score_lambda
        self.latent_seed = latent_seed
        self.primary_score = choice("model.score", score, ANOGAN_SCORES)

    @property
    def monitor(self) -> None:
        """No leak-free validation loss ranks GAN epochs (D and G losses are relative to each
        other); the last epoch is scored, as in AnoGAN."""
        return None

    # ---- DCGAN training -------------------------------------------------------------
    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, 1, 1, device=self.device, generator=generator)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One DCGAN step: D on real vs generated (BCE), then G to fool D (non-saturating BCE)."""
        x = batch["image"]
        opt_g, opt_d = self.optimizers()
        fake = self.generator(self.sample_latent(len(x)))

        self.toggle_optimizer(opt_d)
        logit_real, _ = self.discriminator(x)
        logit_fake, _ = self.discriminator(fake.detach())
        loss_d = F.binary_cross_entropy_with_logits(
            logit_real, torch.ones_like(logit_real)
        ) + F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake))
        self.check_finite(loss_d, "discriminator loss")
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        self.untoggle_optimizer(opt_d)

        self.toggle_optimizer(opt_g)
        logit_fake, _ = self.discriminator(fake)
        loss_g = F.binary_cross_entropy_with_logits(logit_fake, torch.ones_like(logit_fake))
        self.check_finite(loss_g, "generator loss")
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        self.untoggle_optimizer(opt_g)

        self.log_dict(
            {"train/loss_d": loss_d, "train/loss_g": loss_g}, prog_bar=True, batch_size=len(x)
        )

    # ---- test: latent search ---------------------------------------------------------
    def mapping_loss(
        self, x: torch.Tensor, f_x: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image: (total, residual R, discrimination D), each a per-element mean, and G(z)."""
        g = self.generator(z)
        _, f_g = self.discriminator(g)
        residual = (x - g).abs().flatten(1).mean(1)
        discrimination = (f_x - f_g).abs().flatten(1).mean(1)
        lam = self.score_lambda
        return (1 - lam) * residual + lam * discrimination, residual, discrimination, g

    def search_latent(self, x: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """z* = argmin_z loss(z) by Adam from a random start seeded per image (`seeds`), so the
        same image gets the same score whatever its batch or position in it."""
        shape = (self.latent_dim, 1, 1)
        z = per_image_normal(seeds, shape, x.device, x.dtype).requires_grad_(True)
        optimizer = torch.optim.Adam([z], lr=self.latent_lr)
        with torch.no_grad():
            _, f_x = self.discriminator(x)
        for _ in range(self.latent_steps):
            total = self.mapping_loss(x, f_x, z)[0]
            # gradient for z only: G and D stay untouched; summing keeps each image's z independent
            (grad,) = torch.autograd.grad(total.sum(), [z])
            z.grad = grad
            optimizer.step()
        return z.detach()

    def score(self, batch: dict[str, Any]) -> Scores:
        # A test loop under inference mode would make x an inference tensor autograd cannot use.
        with torch.inference_mode(False), torch.enable_grad():
            x = batch["image"].clone()
            z = self.search_latent(x, image_seeds(batch, self.latent_seed))
        with torch.no_grad():
            _, f_x = self.discriminator(x)
            total, residual, discrimination, g = self.mapping_loss(x, f_x, z)
        return Scores(
            image={"anogan": total, "residual": residual, "discrimination": discrimination},
            map=(x - g).abs().mean(1),
        )

    def describe(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "latent_dim": self.latent_dim,
            "latent_steps": self.latent_steps,
            "latent_lr": self.latent_lr,
            "score_lambda": self.score_lambda,
            "expects_normalize": "half",
        }
