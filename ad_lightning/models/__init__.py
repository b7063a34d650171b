"""Methods: one LightningModule per paper, all evaluated by models.base.AnomalyModule.

`list_methods()` and `method_info(name)` (models/registry.py) say which there are and what
each can do, from the model configs.
"""

from ad_lightning.models.base import AnomalyModule, DivergenceError, Scores
from ad_lightning.models.registry import MethodInfo, list_methods, method_info

__all__ = [
    "AnomalyModule",
    "DivergenceError",
    "MethodInfo",
    "Scores",
    "list_methods",
    "method_info",
]
