"""Decision thresholds.

- `false_alarm_threshold`: leak-free and the one a model ships with; the lowest threshold at
  which at most a `rate` fraction of normal validation scores lies above it (verdict:
  anomalous when `score > threshold`). It is never below the normal scores' minimum (which
  would flag every image: the bug this guards against); with fewer than 1/rate normal
  images it is their maximum.
- `f1_optimal_threshold`: needs labelled defective images (`data.threshold_split`); the
  threshold of best F1 on them, an option for lines that have such images.
- `defect_ratio_threshold`: the DPAE protocol; flags as anomalous the top fraction of
  test scores equal to the test set's defect ratio. It uses the test labels' ratio, so it is
  reported as the paper's protocol, not used for model selection.
"""

from __future__ import annotations

import torch


def false_alarm_threshold(normal_scores: torch.Tensor, rate: float) -> float:
    """Threshold t with #(normal > t) <= floor(rate * n): an empirical false-alarm rate <= rate."""
    values = normal_scores.detach().double().flatten().cpu()
    if values.numel() == 0:
        raise ValueError(
            "no normal validation scores to set a threshold from; set data.val_split > 0"
        )
    if not 0 <= rate < 1:
        raise ValueError(f"eval.false_alarm_rate={rate} must be in [0, 1)")
    allowed = int(rate * values.numel())  # normal images that may lie above t
    k = values.numel() - allowed  # t is the k-th smallest score
    return float(torch.kthvalue(values, k).values)


def f1_optimal_threshold(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(threshold, F1) of best F1 for `score > threshold` on labelled images.

    Every distinct score is a candidate (and one below all, which flags every image); F1 is
    counted on the raw scores, so any score scale works (torchmetrics' curve would sigmoid
    scores outside [0, 1] first). Among equal F1 the lowest threshold is kept."""
    labels = labels.long().cpu().bool()
    if labels.all() or not labels.any():
        raise ValueError(
            "an F1-optimal threshold needs both normal and defective images in data.threshold_split"
        )
    values = scores.detach().double().cpu().flatten()
    candidates = torch.cat([values.min()[None] - 1, torch.unique(values)])
    flagged = values[None, :] > candidates[:, None]  # [candidates, images]
    tp = (flagged & labels).sum(1)
    fp = (flagged & ~labels).sum(1)
    fn = (~flagged & labels).sum(1)
    f1 = 2 * tp / (2 * tp + fp + fn).clamp_min(1)
    best = int(torch.argmax(f1))
    return float(candidates[best]), float(f1[best])


def defect_ratio_threshold(scores: torch.Tensor, defect_ratio: float) -> float:
    """The score of the k-th highest image, k = round(ratio * N): `scores >= t` flags k images."""
    k = int(round(defect_ratio * scores.numel()))
    k = min(max(k, 1), scores.numel())
    return float(torch.sort(scores.double(), descending=True).values[k - 1])
