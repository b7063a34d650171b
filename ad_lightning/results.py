"""The typed results of a run: what evaluation hands to train.py, and what results.json holds.

`TestResults` is the output of scoring the test split once (metrics, per-score statistics,
per-image records, kept maps, validation scores, thresholds, timing). The run-level schema
(`RunResults`, written to results.json with a schema version) is built on top of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TestResults:
    """One scoring of the test split, gathered over every rank."""

    #: the name in the method's scores that `metrics.image_auroc` reports
    primary_score: str
    #: headline metrics: image_auroc, image_ap, f1_at_false_alarm_rate, pixel_auroc, ...
    metrics: dict[str, float]
    #: metrics that peek at the test labels (defect-ratio F1), kept apart under leak_free
    test_label_metrics: dict[str, float]
    #: per score name: auroc, ap, at_defect_ratio, at_false_alarm_rate
    scores: dict[str, dict[str, Any]]
    #: one row per test image: path, label, defect_type, each score (and `<score>_normalized`)
    records: list[dict[str, Any]] = field(default_factory=list)
    #: small anomaly maps per image path (fp16), for heat maps
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    #: scores of the normal validation images, per score name
    val_scores: dict[str, list[float]] = field(default_factory=dict)
    #: image and pixel thresholds fitted on normal images (None without validation images)
    thresholds: dict[str, Any] | None = None
    inference_ms_per_image: float = 0.0
    n_images_timed: int = 0

    def __getitem__(self, key: str) -> Any:
        """Dict-style reading (`results["metrics"]`), as the callers of the untyped dict did."""
        if key not in self.__dataclass_fields__:
            raise KeyError(
                f"TestResults has no field {key!r}; fields: {sorted(self.__dataclass_fields__)}"
            )
        return getattr(self, key)
