"""Deep-feature kNN: the one-class step of Saeedi & Giusti, and their deep-feature baseline.

Shared scorer (`KNNScorer`): training embeddings are (optionally) standardised with the
mean/std of the training embeddings themselves, indexed with scikit-learn's
NearestNeighbors, and a query scores the mean squared Euclidean distance to its k nearest
training embeddings. CPCAE feeds it embeddings of anomaly maps; the baseline (`DeepKNN`)
feeds global-max-pooled ImageNet-CNN features of the raw image, with k = 15.

The fitted bank lives in buffers (so it is in checkpoints) whose shapes are only known
after fitting; loading a state dict resizes them to the stored shapes.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors

from ad_lightning.backbones.features import FeatureExtractor
from ad_lightning.models.base import Scores
from ad_lightning.models.families.statistics import ResizableBuffers, StatisticsModule
from ad_lightning.nn.pooling import global_max_pool

log = logging.getLogger(__name__)


class KNNScorer(ResizableBuffers):
    """Mean squared Euclidean distance to the k nearest (standardised) training embeddings."""

    def __init__(self, k: int = 15, standardize: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        self.k = k
        self.standardize = standardize
        self.eps = eps
        self.register_buffer("bank", torch.empty(0, 0))
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("std", torch.empty(0))
        self._index: NearestNeighbors | None = None

    @property
    def fitted(self) -> bool:
        return self.bank.numel() > 0

    def reset(self) -> None:
        self.bank, self.mean, self.std = (
            self.bank.new_empty(0, 0),
            self.mean.new_empty(0),
            self.std.new_empty(0),
        )
        self._index = None

    def _on_buffers_loaded(self) -> None:
        self._index = None

    def _standardise(self, embeddings: torch.Tensor) -> torch.Tensor:
        return (embeddings - self.mean) / self.std if self.standardize else embeddings

    @torch.no_grad()
    def fit(self, embeddings: torch.Tensor) -> None:
        """Fit the mean/std and the neighbour index on the training embeddings [N, D]."""
        embeddings = embeddings.detach().float().flatten(1)
        if len(embeddings) == 0:
            raise ValueError("no training embeddings to fit the kNN scorer on")
        # population std; a constant feature gets std 1 (it carries no information either way)
        std = embeddings.std(0, unbiased=False)
        self.mean = embeddings.mean(0)
        self.std = torch.where(std > self.eps, std, torch.ones_like(std))
        self.bank = self._standardise(embeddings)
        self._index = None
        if self.k > len(embeddings):
            log.warning(
                "kNN: k=%d > %d training embeddings; using all of them", self.k, len(embeddings)
            )

    def index(self) -> NearestNeighbors:
        if self._index is None:
            if not self.fitted:
                raise RuntimeError(
                    "KNNScorer is not fitted: training embeddings are collected at the end of training"
                )
            bank = self.bank.detach().cpu().double().numpy()
            self._index = NearestNeighbors(
                n_neighbors=min(self.k, len(bank)), metric="euclidean"
            ).fit(bank)
        return self._index

    @torch.no_grad()
    def kneighbors(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distances [B, k] and indices [B, k] of the nearest training embeddings."""
        query = self._standardise(embeddings.detach().float().flatten(1))
        dist, idx = self.index().kneighbors(query.cpu().double().numpy())
        return torch.from_numpy(np.square(dist)).to(embeddings.device), torch.from_numpy(idx).to(
            embeddings.device
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[B, D] -> [B]: mean squared distance to the k nearest training embeddings."""
        return self.kneighbors(embeddings)[0].mean(1).float()


class DeepKNN(StatisticsModule):
    """Deep-feature baseline: kNN (k = 15) on global-max-pooled CNN features of the raw image."""

    score_names = ("knn",)

    export_blocker = (
        "its score is a scikit-learn neighbour search, which is not part of an ONNX graph"
    )

    def __init__(
        self, backbone: FeatureExtractor, k: int = 15, standardize: bool = False, score: str = "knn"
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        if score != "knn":
            raise ValueError(f"model.score={score!r}: deep_knn has one score, 'knn'")
        self.primary_score = score
        self.backbone = backbone
        self.scorer = KNNScorer(k, standardize)

    def describe(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone.describe(),
            "k": self.scorer.k,
            "standardize": self.scorer.standardize,
            "n_train_embeddings": len(self.scorer.bank),
        }

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return global_max_pool(self.backbone(images))

    def collect(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.embed(batch["image"])

    def finalise(self, rows: torch.Tensor) -> None:
        self.scorer.fit(rows)

    def score(self, batch: dict[str, Any]) -> Scores:
        return Scores(image={"knn": self.scorer(self.embed(batch["image"]))})
