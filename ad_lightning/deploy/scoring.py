"""The public way to score images with a method, and the scoring path as one module.

`score_images` is what every deployed scorer calls (the scoring graph that predict runs and
the ONNX export traces): `AnomalyModule.score_batch`, the same call the test loop makes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ad_lightning.models.base import AnomalyModule, Scores

if TYPE_CHECKING:
    from ad_lightning.deploy.bundle import Preprocess


def score_images(model: AnomalyModule, batch: dict[str, Any]) -> Scores:
    """A batch (`image` normalised as in training, optional `path`) -> float32 scores [B]
    by name and the anomaly map [B, H, W] if the method has one, detached: the model's own
    `score_batch`, which its test loop runs too, so deployed scores equal tested ones."""
    return model.score_batch(batch)


#: every output a scoring graph can have, in their order; a graph has `score` always, `map`
#: for methods with maps, and the post-processor's outputs for the buffers that are set
OUTPUTS = ("score", "map", "score_normalized", "verdict", "pixel_verdict")


class ScoringGraph(nn.Module):
    """The whole scoring path as one module: [B, C, H, W] images in [0, 1] at the model's
    size -> normalisation -> method -> post-processing, as outputs by name: `score` [B], `map`
    [B, H, W] if the method has one, and what the model's post-processor decides with its set
    buffers (`score_normalized`, `verdict`, `pixel_verdict`). Predict runs it, and the ONNX
    export traces it, so the exported graph carries the thresholds and decides as PyTorch
    does; callers take outputs by name, never by position."""

    def __init__(self, model: AnomalyModule, preprocess: Preprocess) -> None:
        super().__init__()
        self.model = model
        stats = preprocess.mean_std()
        self.normalised = stats is not None
        mean, std = stats or ((0.0,) * preprocess.channels, (1.0,) * preprocess.channels)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(
        self, images: torch.Tensor, paths: list[str] | None = None
    ) -> dict[str, torch.Tensor]:
        x = (images - self.mean) / self.std if self.normalised else images
        batch: dict[str, Any] = {"image": x}
        if paths is not None:  # methods that seed noise per image seed it by path, as in testing
            batch["path"] = paths
        out = score_images(self.model, batch)
        named = {"score": out.image[self.model.primary_score]}
        if out.map is not None:
            named["map"] = out.map
        return {**named, **self.model.post_processor.outputs(named["score"], out.map)}
