"""Image- and pixel-level metrics, computed once for every method."""

from ad_lightning.metrics.evaluator import evaluate_scores, pixel_auroc, threshold_stats
from ad_lightning.metrics.thresholds import (
    defect_ratio_threshold,
    f1_optimal_threshold,
    false_alarm_threshold,
)

__all__ = [
    "defect_ratio_threshold",
    "evaluate_scores",
    "f1_optimal_threshold",
    "false_alarm_threshold",
    "pixel_auroc",
    "threshold_stats",
]
