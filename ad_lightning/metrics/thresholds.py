"""Decision thresholds.

- `percentile_threshold`: leak-free; a high percentile of scores of normal validation
  images. Never their minimum (which flags every test image as anomalous).
- `defect_ratio_threshold`: the DPAE protocol; flags as anomalous the top fraction of
  test scores equal to the test set's defect ratio. It uses the test labels' ratio, so it is
  reported as the paper's protocol, not used for model selection.
"""

from __future__ import annotations

import torch


def percentile_threshold(normal_scores: torch.Tensor, percentile: float) -> float:
    if normal_scores.numel() == 0:
        raise ValueError("no validation scores to set a threshold from; set data.val_split > 0")
    if not 0 < percentile <= 100:
        raise ValueError(f"eval.threshold_percentile={percentile} must be in (0, 100]")
    return float(torch.quantile(normal_scores.double(), percentile / 100.0))


def defect_ratio_threshold(scores: torch.Tensor, defect_ratio: float) -> float:
    """The score of the k-th highest image, k = round(ratio * N): `scores >= t` flags k images."""
    k = int(round(defect_ratio * scores.numel()))
    k = min(max(k, 1), scores.numel())
    return float(torch.sort(scores.double(), descending=True).values[k - 1])
