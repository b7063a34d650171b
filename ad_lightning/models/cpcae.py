"""CPCAE + deep-feature one-class kNN (Saeedi & Giusti, IDSIA).

1. The image (registered, in [0, 1]) is downsized to `work_size` and cut into overlapping
   patches. One conditional patch autoencoder, told each patch's position, reconstructs
   them through a dense bottleneck; loss = L2 reconstruction + lambda * L1 of the code.
2. Anomaly map: all reconstructed patches are put back (overlaps averaged), the result is
   upsized to the image and subtracted from it: |x - x_hat|, averaged over channels.
3. One-class step, after the AE is trained: each anomaly map, at full resolution, is
   embedded by a frozen ImageNet CNN (cut before its global pooling) with the parallel +
   cascaded pooling head; embeddings are standardised with the training embeddings'
   mean/std; the score is the mean squared distance to the k nearest training embeddings.

Scores from one pass: `knn` (the method) and `reconstruction` (the AE's mean squared error
at the work size: the paper's AE (L2) baseline).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ad_lightning.backbones.features import FeatureExtractor
from ad_lightning.checks import choice
from ad_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ad_lightning.models.base import Scores, SingleObjective
from ad_lightning.models.families.autoencoder import AutoencoderModule
from ad_lightning.models.families.statistics import fit_on_rank_zero
from ad_lightning.models.families.training_images import training_images
from ad_lightning.models.knn import KNNScorer
from ad_lightning.nn.cpcae import ConditionalPatchAE
from ad_lightning.nn.patches import PatchGrid, assemble_patches, extract_patches
from ad_lightning.nn.pooling import ParallelCascadedPooling
from ad_lightning.precision import scoring_context

log = logging.getLogger(__name__)


class CPCAE(SingleObjective, AutoencoderModule):
    #: knn: the method; reconstruction: its AE (L2) baseline
    score_names = ("knn", "reconstruction")
    export_blocker = (
        "its score is a scikit-learn neighbour search, which is not part of an ONNX graph"
    )
    backbone_reads_images = False  # it embeds anomaly maps, normalised for it in embed()

    def __init__(
        self,
        backbone: FeatureExtractor,
        channels: int = 3,
        work_size: int = 128,
        patch_size: int = 32,
        patch_stride: int = 16,
        widths: Sequence[int] = (32, 64, 128),
        hidden: int = 512,
        code_size: int = 64,
        condition: str = "scalar",
        output: str = "sigmoid",
        l1_weight: float = 1e-3,
        lr: float = 1e-3,
        k: int = 15,
        standardize: bool = True,
        cascade_kernel: int = 2,
        score: str = "knn",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.primary_score = choice("model.score", score, self.score_names)
        self.backbone = backbone
        self.grid = PatchGrid(work_size, work_size, patch_size, patch_stride)
        self.autoencoder = ConditionalPatchAE(
            patch_size,
            channels,
            self.grid.num_patches,
            widths,
            hidden,
            code_size,
            condition,
            output,
        )
        self.pooling = ParallelCascadedPooling(cascade_kernel)
        self.scorer = KNNScorer(k, standardize)
        self.work_size = work_size
        self.l1_weight = l1_weight
        self.lr = lr
        # the maps are fed to the backbone with its weights' own statistics (Xception's are
        # mean = std = 0.5, not ImageNet's); data.normalize is the AE's, not the backbone's.
        # Saved with the model: the kNN bank holds embeddings made with them
        mean, std = self.backbone.input_stats or (IMAGENET_MEAN, IMAGENET_STD)
        self.register_buffer("map_mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("map_std", torch.tensor(std).view(1, 3, 1, 1))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """A file saved before the maps' statistics were (their bank embedded with ImageNet's,
        whatever the backbone) loads with ImageNet's, so its scores stay what they were."""
        for name, value in (("map_mean", IMAGENET_MEAN), ("map_std", IMAGENET_STD)):
            state_dict.setdefault(f"{prefix}{name}", torch.tensor(value).view(1, 3, 1, 1))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def describe(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone.describe(),
            "patches": {
                "work_size": self.work_size,
                "size": self.grid.size,
                "stride": self.grid.stride,
                "count": self.grid.num_patches,
            },
            "pooling": "parallel(global max, global avg) + cascaded(max-pool k, global avg)",
            "k": self.scorer.k,
            "n_train_embeddings": len(self.scorer.bank),
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.autoencoder.parameters(), lr=self.lr)

    # ---- the autoencoder ------------------------------------------------------------
    def downsize(self, images: torch.Tensor) -> torch.Tensor:
        return F.interpolate(
            images, size=self.work_size, mode="bilinear", align_corners=False, antialias=True
        )

    def reconstruct_patches(
        self, small: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Work-size images -> (patches [B, N, C, p, p], reconstructions, codes [B*N, code])."""
        patches = extract_patches(small, self.grid)
        b, n = patches.shape[:2]
        position = torch.arange(n, device=small.device).repeat(b)
        recon, code = self.autoencoder(patches.flatten(0, 1), position)
        return patches, recon.view_as(patches), code

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """L2 reconstruction of every patch + lambda * L1 of the bottleneck code (sum over units)."""
        patches, recon, code = self.reconstruct_patches(self.downsize(images))
        return F.mse_loss(recon, patches) + self.l1_weight * code.abs().sum(1).mean()

    def anomaly_map(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """|x - upsize(reassembled reconstruction)| averaged over channels [B, H, W], and the AE's L2 [B]."""
        small = self.downsize(images)
        _, recon, _ = self.reconstruct_patches(small)
        recon_small = assemble_patches(recon, self.grid)
        recon_full = F.interpolate(
            recon_small, size=images.shape[-2:], mode="bilinear", align_corners=False
        )
        l2 = (recon_small - small).pow(2).flatten(1).mean(1)
        return (images - recon_full).abs().mean(1), l2

    # ---- the one-class step ---------------------------------------------------------
    def embed(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Anomaly map [B, H, W] (values in [0, 1]) as a gray image through the CNN and pooling head."""
        gray = anomaly_map[:, None].expand(-1, 3, -1, -1)
        return self.pooling(self.backbone((gray - self.map_mean) / self.map_std))

    @torch.no_grad()
    def fit_embeddings(self) -> None:
        """Embed the training images' anomaly maps with the trained AE and fit the kNN scorer."""
        was_training = self.training
        self.eval()
        rows = []
        with scoring_context(self):  # the precision the queries are embedded in at test time
            for batch in training_images(self, shard=True):
                rows.append(self.embed(self.anomaly_map(batch["image"])[0]).float())
        # under DDP: rows gathered on rank 0, fitted there, the bank broadcast to every rank
        fit_on_rank_zero(self, torch.cat(rows), self._fit_scorer, self.scorer)
        self.train(was_training)

    def _fit_scorer(self, embeddings: torch.Tensor) -> None:
        self.scorer.fit(embeddings)
        log.info(
            "CPCAE: kNN scorer fitted on %d training embeddings of size %d", *self.scorer.bank.shape
        )

    def on_fit_start(self) -> None:
        self.scorer.reset()

    def on_fit_end(self) -> None:
        self.fit_embeddings()

    def on_test_epoch_start(self) -> None:
        # checkpoints are saved during training, before the bank exists: after loading
        # one for testing, the bank is fitted for exactly the AE weights being tested
        if not self.scorer.fitted:
            self.fit_embeddings()
        super().on_test_epoch_start()

    def score(self, batch: dict[str, Any]) -> Scores:
        anomaly_map, l2 = self.anomaly_map(batch["image"])
        return Scores(
            image={"knn": self.scorer(self.embed(anomaly_map)), "reconstruction": l2},
            map=anomaly_map,
        )
