"""The GAN family: a DCGAN-style generator and discriminator, each with its own Adam.

`GANModule` holds what every GAN method shares (manual optimisation, the two optimisers, the
[-1, 1] input range their tanh outputs need); `AdversarialReconstruction` what GANomaly and
Skip-GANomaly share on top (a reconstructing generator, D trained to tell x from x_hat).
AnoGAN, whose generator starts from noise, uses only the first.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ad_lightning.distributed import broadcast_module
from ad_lightning.models.base import AnomalyModule
from ad_lightning.nn.dcgan import DCGANDiscriminator, init_dcgan_weights

log = logging.getLogger(__name__)


class GANModule(AnomalyModule):
    """Family base: a generator and a discriminator trained by manual optimisation."""

    family = "gan"
    #: each backward reaches only G's or only D's trainable parameters (toggle_optimizer)
    ddp_find_unused_parameters = True
    generator: nn.Module
    discriminator: DCGANDiscriminator

    def __init__(self, lr: float, beta1: float, beta2: float) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.lr = lr
        self.betas = (beta1, beta2)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.Adam(self.generator.parameters(), lr=self.lr, betas=self.betas),
            torch.optim.Adam(self.discriminator.parameters(), lr=self.lr, betas=self.betas),
        ]

    def on_fit_start(self) -> None:
        normalize = getattr(self.trainer.datamodule, "normalize", "half")
        if normalize != "half":
            log.warning(
                "%s generates with tanh in [-1, 1] but data.normalize=%s; use data.normalize=half",
                type(self).__name__,
                normalize,
            )


def mean_over_pixels(t: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over every non-batch dimension: [B, ...] -> [B]."""
    return t.flatten(1).mean(1)


class AdversarialReconstruction(GANModule):
    """What GANomaly and Skip-GANomaly share: a generator that reconstructs x and a DCGAN
    discriminator D trained with BCE to tell x (real) from x_hat (fake), each with its own
    Adam, updated generator first then discriminator in every step (manual optimisation).

    As in the original GANomaly code, D is re-initialised when its loss falls below
    `reinit_d_below`: a discriminator that wins outright gives the generator no signal.
    Model selection (leak-free) uses the reconstruction loss L_con on normal validation images.
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: DCGANDiscriminator,
        lr: float,
        beta1: float,
        beta2: float,
        reinit_d_below: float,
    ) -> None:
        super().__init__(lr, beta1, beta2)
        self.generator = generator
        self.discriminator = discriminator
        self.reinit_d_below = reinit_d_below
        init_dcgan_weights(self)

    # ---- what a subclass adds -----------------------------------------------------
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """x_hat = G(x)."""
        raise NotImplementedError

    def generator_loss(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """(weighted loss, its named parts, x_hat) for one generator step."""
        raise NotImplementedError

    # ---- training -----------------------------------------------------------------
    def discriminator_loss(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """BCE: real images -> 1, reconstructions -> 0 (averaged, as in GANomaly's code)."""
        logit_real, _ = self.discriminator(x)
        logit_fake, _ = self.discriminator(x_hat.detach())
        real = F.binary_cross_entropy_with_logits(logit_real, torch.ones_like(logit_real))
        fake = F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake))
        return 0.5 * (real + fake)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = batch["image"]
        opt_g, opt_d = self.optimizers()

        self.toggle_optimizer(opt_g)  # D's weights are frozen while gradients flow through D
        loss_g, parts, x_hat = self.generator_loss(x)
        self.check_finite(loss_g, "generator loss")
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        self.untoggle_optimizer(opt_g)

        self.toggle_optimizer(opt_d)
        loss_d = self.check_finite(self.discriminator_loss(x, x_hat), "discriminator loss")
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        self.untoggle_optimizer(opt_d)
        # one decision for all DDP ranks (on the mean loss), and rank 0's new weights on each
        if float(self.trainer.strategy.reduce(loss_d.detach(), reduce_op="mean")) < (
            self.reinit_d_below
        ):
            init_dcgan_weights(self.discriminator)
            broadcast_module(self.discriminator)

        n = len(x)
        self.log("train/loss_g", loss_g, prog_bar=True, batch_size=n)
        self.log("train/loss_d", loss_d, prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=n)

    def validation_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """L_con on normal validation images: comparable across epochs, unlike the adversarial terms."""
        x = batch["image"]
        return F.l1_loss(self.reconstruct(x), x)

    def describe(self) -> dict[str, Any]:
        return {"expects_normalize": "half", "reinit_d_below": self.reinit_d_below}
