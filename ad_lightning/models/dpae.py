"""DPAE: dual prototype autoencoder (Liu, Song, Feng, Yan, Tu, Zhu).

Encoder-1 maps an image x to a latent vector z, the decoder reconstructs x_hat from z, and
encoder-2 (same architecture, its own weights) maps x_hat to z_hat. Two prototypes, v_p for
z and v_p_hat for z_hat, summarise the normal latent codes: randomly initialised, they move
after every mini-batch toward the batch mean (delta v = mean over the batch of (v - z)).
Training minimises

    ||x - x_hat||^2 + (lambda / 2) ||z - v_p||^2 + (gamma / 2) ||z_hat - v_p_hat||^2,

so normal images reconstruct well and their codes, before and after reconstruction, gather
around the prototypes. A defect is reconstructed as something normal, so z (which still
sees the defect) and z_hat (which sees the repaired image) disagree: the score is
RLZ = ||z - z_hat||^2. One forward pass also gives the ablation scores RLX = ||x - x_hat||^2,
PL1 = ||z - v_p||^2 and PL2 = ||z_hat - v_p_hat||^2.

Our choices where the paper is silent (all constructor arguments):
- `prototype_rate` eta: v <- v - eta * delta v. The paper gives the direction, not the step;
  0.5 is ours (a centre-loss-style step). eta = 1 sets v to the batch mean.
- `reduction`: how the sums of the objective are scaled. "sum" is the paper's formula
  literally (each term summed over its elements, averaged over the batch). With SGD at
  lr 1e-3 its reconstruction gradient, which grows with C H W, saturates the sigmoid output
  in the first steps at 224 px, and at 64 px with the paper's widths (measured; narrower
  early levels train at 64 px). "pixel_mean" (default) divides the whole objective by the
  number of pixel values C H W, and SGD's weight decay by the same number: the paper's
  objective (decay included) divided by a constant, so the same minimiser and the same
  balance between its terms, with mean-squared-error-sized gradients at any image size. Its cost: the prototype terms are scaled down with the rest, so on the
  parameters BatchNorm does not rescale (the latent BatchNorm's affine, the output layer)
  compactness acts C H W times more slowly than under the literal sum. "mean" averages each
  term over its own elements, which weighs the prototype terms C H W / d times more than
  the paper; kept for comparison.
- `loss=prototype` (ablation "prototype loss only"): only the two prototype terms are
  minimised. x_hat is still decoded, because z_hat = E2(x_hat); the decoder is trained only
  through the z_hat term. `loss=reconstruction`: only the reconstruction term; encoder-2
  still runs (it updates v_p_hat and its BatchNorm statistics, so RLZ and PL2 are defined)
  but receives no gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from ad_lightning.checks import choice
from ad_lightning.models.base import Scores
from ad_lightning.models.families.autoencoder import SGDAutoencoder, pixel_values
from ad_lightning.nn.conv_ae import ConvDecoder, ConvEncoder, paper_widths

LOSSES = ("both", "reconstruction", "prototype")
SCORES = ("rlz", "rlx", "pl1", "pl2")
REDUCTIONS = ("pixel_mean", "sum", "mean")


class DPAE(SGDAutoencoder):
    score_names = SCORES

    def __init__(
        self,
        image_size: int | Sequence[int] = 224,
        channels: int = 3,
        latent_dim: int = 32,
        widths: Sequence[int] | None = None,
        loss: str = "both",
        lam: float = 1.0,
        gamma: float = 1.0,
        prototype_rate: float = 0.5,
        reduction: str = "pixel_mean",
        output_activation: str = "sigmoid",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        score: str = "rlz",
    ) -> None:
        super().__init__()
        choice("model.loss", loss, LOSSES)
        choice("model.reduction", reduction, REDUCTIONS)
        if not 0.0 < prototype_rate <= 1.0:
            raise ValueError(f"model.prototype_rate={prototype_rate} must be in (0, 1]")
        self.save_hyperparameters()
        self.primary_score = choice("model.score", score, SCORES)
        self.loss_mode = loss
        self.lam, self.gamma = lam, gamma
        self.prototype_rate = prototype_rate
        self.reduction = reduction
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        # pixel_mean divides the summed objective by C*H*W; the weight decay is divided alike
        self.loss_divisor = pixel_values(channels, image_size) if reduction == "pixel_mean" else 1.0
        widths = list(widths) if widths else paper_widths(latent_dim)
        self.widths = widths
        self.encoder1 = ConvEncoder(channels, image_size, widths, latent_dim)
        self.decoder = ConvDecoder(latent_dim, image_size, widths, channels, output_activation)
        self.encoder2 = ConvEncoder(channels, image_size, widths, latent_dim)
        # Buffers, not parameters: they are moved by the update rule, not by the optimiser,
        # and they travel with checkpoints.
        self.register_buffer("v_p", torch.randn(latent_dim))
        self.register_buffer("v_p_hat", torch.randn(latent_dim))

    def describe(self) -> dict[str, Any]:
        return {
            "latent_dim": self.hparams.latent_dim,
            "widths": self.widths,
            "loss": self.loss_mode,
            "prototype_rate": self.prototype_rate,
            "reduction": self.reduction,
            "parameters": sum(p.numel() for p in self.parameters()),
        }

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z, x_hat, z_hat) for an image batch."""
        z = self.encoder1(x)
        x_hat = self.decoder(z)
        return z, x_hat, self.encoder2(x_hat)

    def _per_image(self, sq: torch.Tensor, n_pixel_values: int) -> torch.Tensor:
        """Squared errors [B, ...] -> one value per image, reduced as `reduction` says."""
        flat = sq.flatten(1)
        if self.reduction == "mean":
            return flat.mean(1)
        total = flat.sum(1)
        return total / n_pixel_values if self.reduction == "pixel_mean" else total

    def loss_terms(
        self, x: torch.Tensor, z: torch.Tensor, x_hat: torch.Tensor, z_hat: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The three terms of the objective, each averaged over the batch (weights applied)."""
        n = x[0].numel()
        return {
            "reconstruction": self._per_image((x - x_hat).pow(2), n).mean(),
            "prototype": self.lam / 2 * self._per_image((z - self.v_p).pow(2), n).mean(),
            "prototype_hat": self.gamma
            / 2
            * self._per_image((z_hat - self.v_p_hat).pow(2), n).mean(),
        }

    def objective(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """What `model.loss` optimises: both, reconstruction only, or prototype terms only."""
        if self.loss_mode == "reconstruction":
            return terms["reconstruction"]
        proto = terms["prototype"] + terms["prototype_hat"]
        return proto if self.loss_mode == "prototype" else terms["reconstruction"] + proto

    @torch.no_grad()
    def update_prototypes(self, z: torch.Tensor, z_hat: torch.Tensor) -> None:
        """v <- v - eta * mean_batch(v - z) for both prototypes.

        Under DDP the batch means are taken over all ranks (sum and count all-reduced), so
        every rank applies the same step and the prototypes stay identical.
        """
        stats = torch.cat([z.sum(0), z_hat.sum(0), z.new_tensor([len(z)])]).float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        d = len(self.v_p)
        mean_z, mean_z_hat = stats[:d] / stats[-1], stats[d : 2 * d] / stats[-1]
        for v, mean in ((self.v_p, mean_z), (self.v_p_hat, mean_z_hat)):
            delta = v - mean.to(v.dtype)  # = mean over the batch of (v - z)
            v.sub_(self.prototype_rate * delta)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x = batch["image"]
        z, x_hat, z_hat = self(x)
        terms = self.loss_terms(x, z, x_hat, z_hat)
        loss = self.check_finite(self.objective(terms))
        # the loss used the prototypes of this step; they move only afterwards
        self.update_prototypes(z.detach(), z_hat.detach())
        n = len(x)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, batch_size=n)
        return loss

    def validation_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        x = batch["image"]
        return self.objective(self.loss_terms(x, *self(x)))

    def score(self, batch: dict[str, Any]) -> Scores:
        x = batch["image"]
        z, x_hat, z_hat = self(x)
        err = (x - x_hat).pow(2)
        image = {
            "rlz": (z - z_hat).pow(2).sum(1),
            "rlx": err.flatten(1).sum(1),
            "pl1": (z - self.v_p).pow(2).sum(1),
            "pl2": (z_hat - self.v_p_hat).pow(2).sum(1),
        }
        return Scores(image=image, map=err.mean(1))
