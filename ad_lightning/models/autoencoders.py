"""The autoencoder baselines of DPAE's Table 4: AE (L2), AE (SSIM) and VAE.

All three use DPAE's encoder/decoder (ad_lightning.nn.conv_ae) so the comparison isolates the
loss and the score, not the network:
- AE (L2): minimise the mean squared error; score = mean squared error of the image, map =
  squared error averaged over channels.
- AE (SSIM) (Bergmann et al. 2019): minimise 1 - SSIM; score = mean of the residual map
  1 - SSIM (Gaussian window), which is also the anomaly map.
- VAE (Kingma and Welling 2014): the encoder outputs mean and log-variance of q(z|x), the
  decoder the mean of a Gaussian p(x|z) with fixed standard deviation `decoder_std`;
  training minimises the negative ELBO. Scores: `neg_elbo`, and `recon_nll` = the
  reconstruction probability of An and Cho (2015) as a negative log-likelihood,
  -(1/L) sum_l log p(x | z_l) with z_l ~ q(z|x), so that higher is more anomalous.

The DPAE paper gives no training recipe for its baselines; ours is DPAE's own (SGD lr 1e-3,
momentum .9, weight decay 5e-4, 50 epochs, batch 8, horizontal flip), so that the table
compares the methods under one budget. `reduction` scales the loss as in DPAE: the residual
averaged over pixel values (default; for the VAE the per-image -ELBO divided by C H W) or
summed per image, whose gradient grows with the image size and saturates the sigmoid output
under SGD lr 1e-3 at DPAE's widths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ad_lightning.checks import choice
from ad_lightning.models.base import Scores, SingleObjective
from ad_lightning.models.families.autoencoder import SGDAutoencoder
from ad_lightning.nn.conv_ae import ConvAutoencoder, ConvDecoder, ConvEncoder, paper_widths
from ad_lightning.nn.noise import image_seeds, per_image_normal
from ad_lightning.nn.ssim import ssim_map, ssim_residual

AE_LOSSES = ("l2", "ssim")
REDUCTIONS = ("mean", "sum")
VAE_REDUCTIONS = ("pixel_mean", "sum")
AE_SCORES = ("l2", "ssim")
VAE_SCORES = ("neg_elbo", "recon_nll")


class Autoencoder(SingleObjective, SGDAutoencoder):
    """AE (L2) by default; `loss=ssim` (or the SSIMAutoencoder class) gives AE (SSIM)."""

    score_names = AE_SCORES

    def __init__(
        self,
        image_size: int | Sequence[int] = 224,
        channels: int = 3,
        latent_dim: int = 32,
        widths: Sequence[int] | None = None,
        loss: str = "l2",
        score: str = "l2",
        reduction: str = "mean",
        ssim_sigma: float = 1.5,
        data_range: float = 1.0,
        output_activation: str = "sigmoid",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
    ) -> None:
        super().__init__()
        choice("model.loss", loss, AE_LOSSES)
        choice("model.reduction", reduction, REDUCTIONS)
        self.save_hyperparameters()
        self.reduction = reduction
        self.primary_score = choice("model.score", score, AE_SCORES)
        self.loss_name = loss
        self.ssim_sigma, self.data_range = ssim_sigma, data_range
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.ae = ConvAutoencoder(channels, image_size, latent_dim, widths, output_activation)

    def describe(self) -> dict[str, Any]:
        return {
            "latent_dim": self.ae.latent_dim,
            "widths": self.ae.widths,
            "loss": self.loss_name,
            "reduction": self.reduction,
            "parameters": sum(p.numel() for p in self.parameters()),
        }

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image sum (as DPAE's reconstruction term) or mean of the residual, batch mean."""
        x_hat = self.ae(x)[1]
        if self.loss_name == "ssim":
            residual = 1.0 - ssim_map(x_hat, x, self.data_range, self.ssim_sigma)
        else:
            residual = (x - x_hat).pow(2)
        flat = residual.flatten(1)
        return (flat.sum(1) if self.reduction == "sum" else flat.mean(1)).mean()

    def score(self, batch: dict[str, Any]) -> Scores:
        x = batch["image"]
        x_hat = self.ae(x)[1]
        sq = (x - x_hat).pow(2).mean(1)
        dssim = ssim_residual(x_hat, x, self.data_range, self.ssim_sigma)
        image = {"l2": sq.flatten(1).mean(1), "ssim": dssim.flatten(1).mean(1)}
        return Scores(image=image, map=dssim if self.primary_score == "ssim" else sq)


class SSIMAutoencoder(Autoencoder):
    """AE (SSIM): the same AE with SSIM loss and score.

    A class of its own only so that results.json's `model` (the class name), which the report
    groups rows by, tells it apart from AE (L2).
    """

    export_blocker = "its SSIM map (torchmetrics) builds the Gaussian window from the input's shape at run time, which the ONNX exporter cannot hold as a constant"

    def __init__(self, *args: Any, loss: str = "ssim", score: str = "ssim", **kwargs: Any) -> None:
        super().__init__(*args, loss=loss, score=score, **kwargs)


class VAE(SingleObjective, SGDAutoencoder):
    """Variational autoencoder on the same encoder (2 d outputs, no BatchNorm) and decoder."""

    score_names = VAE_SCORES

    export_blocker = "its score samples z with a seed drawn from each image's file path"

    def __init__(
        self,
        image_size: int | Sequence[int] = 224,
        channels: int = 3,
        latent_dim: int = 32,
        widths: Sequence[int] | None = None,
        decoder_std: float = 0.7071,
        kl_weight: float = 1.0,
        n_samples: int = 8,
        noise_seed: int = 0,
        score: str = "neg_elbo",
        reduction: str = "pixel_mean",
        output_activation: str = "sigmoid",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
    ) -> None:
        super().__init__()
        if n_samples < 1:
            raise ValueError(f"model.n_samples={n_samples} must be >= 1")
        choice("model.reduction", reduction, VAE_REDUCTIONS)
        self.save_hyperparameters()
        self.reduction = reduction
        self.primary_score = choice("model.score", score, VAE_SCORES)
        self.decoder_std, self.kl_weight, self.n_samples = decoder_std, kl_weight, n_samples
        self.noise_seed = noise_seed
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.latent_dim = latent_dim
        self.widths = list(widths) if widths else paper_widths(latent_dim)
        # the encoder's vector is (mean, log-variance): no BatchNorm on it
        self.encoder = ConvEncoder(
            channels, image_size, self.widths, 2 * latent_dim, latent_norm=False
        )
        self.decoder = ConvDecoder(latent_dim, image_size, self.widths, channels, output_activation)

    def describe(self) -> dict[str, Any]:
        return {
            "latent_dim": self.latent_dim,
            "widths": self.widths,
            "decoder_std": self.decoder_std,
            "kl_weight": self.kl_weight,
            "reduction": self.reduction,
            "parameters": sum(p.numel() for p in self.parameters()),
        }

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-10.0, 10.0)  # keeps exp(logvar) finite early in training

    def nll(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """-log N(x; x_hat, decoder_std^2 I) per image."""
        n = x[0].numel()
        sq = (x - x_hat).pow(2).flatten(1).sum(1)
        return 0.5 * sq / self.decoder_std**2 + n * (
            math.log(self.decoder_std) + 0.5 * math.log(2 * math.pi)
        )

    @staticmethod
    def kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) per image."""
        return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Negative ELBO per image (one reparameterised sample), batch mean; `pixel_mean`
        divides it by C H W, a constant that keeps SGD's step independent of the image size."""
        mu, logvar = self.posterior(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        neg_elbo = (self.nll(x, self.decoder(z)) + self.kl_weight * self.kl(mu, logvar)).mean()
        return neg_elbo / x[0].numel() if self.reduction == "pixel_mean" else neg_elbo

    def score(self, batch: dict[str, Any]) -> Scores:
        """The z samples of the reconstruction probability are drawn per image, seeded by
        `noise_seed` and the image's path, so an image scores the same in any batch and run."""
        x = batch["image"]
        mu, logvar = self.posterior(x)
        std = (0.5 * logvar).exp()
        seeds = image_seeds(batch, self.noise_seed)
        eps = per_image_normal(seeds, (self.n_samples, *mu.shape[1:]), mu.device, mu.dtype)
        recon_nll = torch.stack(
            [self.nll(x, self.decoder(mu + eps[:, i] * std)) for i in range(self.n_samples)]
        ).mean(0)
        anomaly_map = (x - self.decoder(mu)).pow(2).mean(1)
        image = {
            "neg_elbo": recon_nll + self.kl_weight * self.kl(mu, logvar),
            "recon_nll": recon_nll,
        }
        return Scores(image=image, map=anomaly_map)
