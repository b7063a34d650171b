"""Classic pixel-space baselines of Saeedi & Giusti: the variation model and the nearest image.

Both assume registered images (same object, same place), which is why they do well on
aligned objects and poorly on textures or moving parts.

- Variation model: per-pixel mean and standard deviation over the training images; a
  test image's z-score per pixel and channel, squared, summed over channels is the anomaly
  map; its sum over the image is the score.
- Nearest-neighbour image: the L2 distance to the closest training image (scikit-learn
  NearestNeighbors via the shared kNN scorer, k = 1); the squared difference to that image,
  averaged over channels, is the map.
"""

from __future__ import annotations

from typing import Any

import torch

from ad_lightning.checks import choice
from ad_lightning.models.base import Scores
from ad_lightning.models.families.statistics import ResizableBuffers, StatisticsModule
from ad_lightning.models.knn import KNNScorer


class VariationModel(StatisticsModule, ResizableBuffers):
    """Per-pixel Gaussian of the normal images; score = sum of squared z-scores."""

    score_names = ("z2_sum", "z2_max")

    def __init__(self, min_std: float = 0.01, score: str = "z2_sum") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.primary_score = choice("model.score", score, self.score_names)  # paper: z2_sum
        self.min_std = min_std
        self.register_buffer("pixel_mean", torch.empty(0))
        self.register_buffer("pixel_std", torch.empty(0))

    def describe(self) -> dict[str, Any]:
        return {"min_std": self.min_std}

    def collect(self, batch: dict[str, Any]) -> torch.Tensor:
        return batch["image"].float()

    def finalise(self, rows: torch.Tensor) -> None:
        images = rows.double()
        self.pixel_mean = images.mean(0).float()
        # floor: pixels that never change (background) would otherwise turn noise into huge z
        self.pixel_std = images.std(0, unbiased=False).clamp_min(self.min_std).float()

    def score(self, batch: dict[str, Any]) -> Scores:
        if self.pixel_mean.numel() == 0:
            raise RuntimeError("VariationModel is not fitted: run trainer.fit first")
        z2 = ((batch["image"] - self.pixel_mean) / self.pixel_std).pow(2).sum(1)
        return Scores(
            image={"z2_sum": z2.flatten(1).sum(1), "z2_max": z2.flatten(1).amax(1)}, map=z2
        )


class NearestImage(StatisticsModule):
    """L2 distance to the closest training image."""

    score_names = ("nn_l2",)

    export_blocker = (
        "its score is a scikit-learn neighbour search, which is not part of an ONNX graph"
    )

    def __init__(self, score: str = "nn_l2") -> None:
        super().__init__()
        self.save_hyperparameters()
        if score != "nn_l2":
            raise ValueError(f"model.score={score!r}: nn_image has one score, 'nn_l2'")
        self.primary_score = score
        self.scorer = KNNScorer(k=1, standardize=False)

    def describe(self) -> dict[str, Any]:
        return {"n_train_images": len(self.scorer.bank)}

    def collect(self, batch: dict[str, Any]) -> torch.Tensor:
        return batch["image"].float().flatten(1)

    def finalise(self, rows: torch.Tensor) -> None:
        self.scorer.fit(rows)

    def score(self, batch: dict[str, Any]) -> Scores:
        images = batch["image"].float()
        sq_dist, idx = self.scorer.kneighbors(images)
        nearest = self.scorer.bank[idx[:, 0]].view_as(images)
        return Scores(
            image={"nn_l2": sq_dist[:, 0].sqrt().float()}, map=(images - nearest).pow(2).mean(1)
        )
