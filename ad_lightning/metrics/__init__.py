"""Image- and pixel-level metrics, thresholds, the evaluation of a test split, and the
post-processing module (thresholds and normalisation as buffers), computed once for every
method."""

from ad_lightning.metrics.aupro import aupro
from ad_lightning.metrics.evaluation import EvalConfig, Evaluation, require_threshold_split
from ad_lightning.metrics.evaluator import evaluate_scores, pixel_auroc, threshold_stats
from ad_lightning.metrics.postprocess import PostProcessor
from ad_lightning.metrics.thresholds import (
    defect_ratio_threshold,
    f1_optimal_threshold,
    false_alarm_threshold,
)

__all__ = [
    "EvalConfig",
    "Evaluation",
    "PostProcessor",
    "aupro",
    "defect_ratio_threshold",
    "evaluate_scores",
    "f1_optimal_threshold",
    "false_alarm_threshold",
    "pixel_auroc",
    "require_threshold_split",
    "threshold_stats",
]
