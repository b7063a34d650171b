"""Frozen timm backbones: weight resolution and multi-block feature extraction."""

from ad_lightning.backbones.features import FeatureExtractor
from ad_lightning.backbones.weights import (
    WeightsNotFoundError,
    load_by_name_or_position,
    resolve_weights,
)

__all__ = [
    "FeatureExtractor",
    "WeightsNotFoundError",
    "load_by_name_or_position",
    "resolve_weights",
]
