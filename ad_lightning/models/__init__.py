"""Methods: one LightningModule per paper, all evaluated by models.base.AnomalyModule."""

from ad_lightning.models.base import AnomalyModule, DivergenceError, Scores

__all__ = ["AnomalyModule", "DivergenceError", "Scores"]
