"""Every named score of a method -> AUROC, AP and thresholded statistics (torchmetrics)."""

from __future__ import annotations

import math

import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_f1_score,
    binary_precision,
    binary_recall,
    binary_specificity,
)

from ad_lightning.metrics.thresholds import defect_ratio_threshold, false_alarm_threshold


def unit_scale(values: torch.Tensor) -> torch.Tensor:
    """Affine map onto [0, 1]. torchmetrics treats inputs outside [0, 1] as logits and applies a
    sigmoid, which saturates large scores into ties; an affine map keeps the ranking exactly."""
    values = values.double()
    lo, hi = values.min(), values.max()
    return (values - lo) / (hi - lo) if hi > lo else torch.zeros_like(values)


def pixel_auroc(maps: torch.Tensor, masks: torch.Tensor) -> float:
    """Exact AUROC over all test pixels at once. One affine unit scale over every pixel keeps the
    ranking whatever the batching was (a scale per batch would not), and keeps torchmetrics from
    sigmoiding values outside [0, 1] into ties."""
    return float(binary_auroc(unit_scale(maps.flatten()), masks.flatten().long()))


def threshold_stats(
    scores: torch.Tensor, labels: torch.Tensor, threshold: float, strict: bool = False
) -> dict[str, float]:
    """Precision, TPR (sensitivity), TNR (specificity) and F1 when `score >= threshold` (or
    `score > threshold` with `strict`, the verdict of a shipped model) is anomalous."""
    values = scores.double()
    preds = (values > threshold if strict else values >= threshold).long()
    target = labels.long()
    return {
        "threshold": float(threshold),
        "precision": float(binary_precision(preds, target)),
        "tpr": float(binary_recall(preds, target)),
        "tnr": float(binary_specificity(preds, target)),
        "f1": float(binary_f1_score(preds, target)),
        "flagged": int(preds.sum()),
    }


def evaluate_scores(
    scores: dict[str, torch.Tensor],
    labels: torch.Tensor,
    val_scores: dict[str, torch.Tensor] | None = None,
    false_alarm_rate: float = 0.01,
) -> dict[str, dict]:
    """Metrics per score name. Non-finite scores are an error, never a silent NaN metric."""
    labels = labels.long().cpu()
    ratio = float(labels.float().mean())
    out: dict[str, dict] = {}
    for name, values in scores.items():
        values = values.double().cpu()
        bad = int((~torch.isfinite(values)).sum())
        if bad:
            raise FloatingPointError(
                f"score '{name}' is NaN or infinite for {bad} of {values.numel()} test images; the model diverged, so no metric is written for it"
            )
        result: dict = {
            "auroc": float(binary_auroc(unit_scale(values), labels)),
            "ap": float(binary_average_precision(unit_scale(values), labels)),
            "at_defect_ratio": threshold_stats(
                values, labels, defect_ratio_threshold(values, ratio)
            ),
        }
        val = None if val_scores is None else val_scores.get(name)
        if val is not None and val.numel() > 0:
            threshold = false_alarm_threshold(val, false_alarm_rate)
            result["at_false_alarm_rate"] = threshold_stats(values, labels, threshold, strict=True)
            result["at_false_alarm_rate"]["false_alarm_rate"] = false_alarm_rate
        out[name] = result
    return out


def flatten(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Nested metrics -> 'a/b/c' keys with finite numbers, for loggers."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        elif (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ):
            flat[name] = float(value)
    return flat
