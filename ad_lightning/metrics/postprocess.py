"""Thresholds and score normalisation as buffers of one module, a child of every model.

A fitted model decides with the image and pixel thresholds learned from normal validation
images, and reports the primary score normalised by a min/max. Held as buffers they travel
where the weights travel: in the state dict (checkpoints, model.pt) and, through `forward`,
in a traced (ONNX) graph. The full thresholds dict (rule, counts, the heat-map colour scale)
that results.json and model.pt carry stays beside them, and the buffers are set from it.

A buffer is empty until set. A state dict without these keys (checkpoints and model files from
before this module) loads, strictly too, and leaves them empty: their thresholds are re-fitted
when testing, and model files keep the dict.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ad_lightning.nn.buffers import buffers_from_state

#: the buffers, float64 of shape [1] (empty when unset), so that they equal the thresholds
#: dict's Python floats exactly
BUFFERS = ("image_threshold", "pixel_threshold", "score_min", "score_max")


class PostProcessor(nn.Module):
    """Image threshold, pixel threshold and the primary score's normalisation min/max."""

    image_threshold: torch.Tensor
    pixel_threshold: torch.Tensor
    score_min: torch.Tensor
    score_max: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        #: the thresholds dict of results.json / model.pt ({"image": ..., "pixel": ...} or None)
        self.thresholds: dict[str, Any] | None = None
        for name in BUFFERS:
            self.register_buffer(name, torch.empty(0, dtype=torch.float64))

    # ---- setting ---------------------------------------------------------------------
    def _set(self, name: str, value: float | None) -> None:
        old = self._buffers[name]
        device = old.device if old is not None else None
        self._buffers[name] = (
            torch.empty(0, dtype=torch.float64, device=device)
            if value is None
            # shape [1], not a 0-dim scalar: ONNX export folds arithmetic on 0-dim double
            # buffers in float32 (max - min came out 0.79999995 for 0.9 - 0.1)
            else torch.tensor([float(value)], dtype=torch.float64, device=device)
        )

    def set_thresholds(self, thresholds: dict[str, Any] | None) -> None:
        """Keep `thresholds` and set the threshold buffers to its values (empty where absent)."""
        self.thresholds = thresholds
        image = (thresholds or {}).get("image") or {}
        pixel = (thresholds or {}).get("pixel") or {}
        self._set("image_threshold", image.get("value"))
        self._set("pixel_threshold", pixel.get("value"))

    def set_normalisation(self, low: float | None, high: float | None) -> None:
        """The min/max that map the primary score onto [0, 1] (empty: not set)."""
        self._set("score_min", low)
        self._set("score_max", high)

    def is_set(self, name: str) -> bool:
        return self._buffers[name].numel() > 0

    def value(self, name: str) -> float | None:
        """A buffer as a Python float (None when unset)."""
        return float(self._buffers[name]) if self.is_set(name) else None

    # ---- applying (traceable) --------------------------------------------------------
    def normalise(self, score: torch.Tensor) -> torch.Tensor:
        """(score - min) / (max - min) in float64, 0 where max <= min (as the records'
        `<score>_normalized` column)."""
        low, high = self.score_min, self.score_max
        values = score.double()
        return torch.where(high > low, (values - low) / (high - low), torch.zeros_like(values))

    def forward(
        self, score: torch.Tensor, anomaly_map: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """(normalised score, image verdict `score > image threshold`) and, with a map, the
        pixel verdict `map > pixel threshold`; every needed buffer must be set."""
        out = (self.normalise(score), score.double() > self.image_threshold)
        if anomaly_map is None:
            return out
        return (*out, anomaly_map.double() > self.pixel_threshold)

    def outputs(
        self, score: torch.Tensor, anomaly_map: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """What the set buffers decide, by the exported graph's output names: `score_normalized`
        (with min and max), `verdict` (with the image threshold) and `pixel_verdict` (with a map
        and the pixel threshold). Unset buffers give no output, so a graph traced from a model
        without thresholds has no verdicts rather than verdicts against nothing."""
        out: dict[str, torch.Tensor] = {}
        if self.is_set("score_min") and self.is_set("score_max"):
            out["score_normalized"] = self.normalise(score)
        if self.is_set("image_threshold"):
            out["verdict"] = score.double() > self.image_threshold
        if anomaly_map is not None and self.is_set("pixel_threshold"):
            out["pixel_verdict"] = anomaly_map.double() > self.pixel_threshold
        return out

    # ---- loading ---------------------------------------------------------------------
    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        """Take the stored shapes (empty or one value); a missing key keeps the buffer as it is
        instead of failing a strict load."""
        filled = buffers_from_state(self, state_dict, prefix, keep_missing=True)
        super()._load_from_state_dict(filled, prefix, *args, **kwargs)
