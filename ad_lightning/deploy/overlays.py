"""Predict's per-image outputs of methods with maps: a heat-map overlay and a binary mask at
the image's own size, in folders mirroring the input's."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

#: the folders of `out` that predict writes images into, and the file of its verdicts
OVERLAYS, MASKS = "overlays", "masks"
PREDICTIONS = "predictions.csv"


def heat_colours(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map values -> BGR colours: blue at the normal median, the middle of the scale at the
    pixel threshold, red at twice its distance from the median."""
    scaled = np.clip((values - low) / max(2 * (high - low), 1e-12), 0, 1)
    return cv2.applyColorMap((255 * scaled).astype(np.uint8), cv2.COLORMAP_JET)


class Writer:
    """Overlays and masks at each image's own size, in folders mirroring the input's."""

    def __init__(self, out: Path, root: Path, pixel: float | None, median: float | None) -> None:
        self.out, self.root = out, root
        self.pixel, self.median = pixel, median

    def target(self, kind: str, path: Path) -> Path:
        try:
            relative = path.relative_to(self.root)
        except ValueError:
            relative = Path(path.name)
        # the input's name and extension + .png: a.jpg and a.png get a.jpg.png and a.png.png
        target = self.out / kind / relative.parent / f"{relative.name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    @staticmethod
    def save(target: Path, image: np.ndarray) -> None:
        if not cv2.imwrite(str(target), image):  # OpenCV says False rather than raising
            raise OSError(f"OpenCV could not write {target}")

    def write(
        self, path: Path, original: np.ndarray, amap: np.ndarray, overlays: bool, masks: bool
    ) -> float:
        """Write the image's outputs; return the fraction of its pixels above the pixel
        threshold (NaN without one: then the overlay is scaled by the map's own range and no
        mask is written)."""
        h, w = original.shape[:2]
        full = cv2.resize(amap.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        above = None if self.pixel is None else full > self.pixel
        if masks and above is not None:
            self.save(self.target(MASKS, path), above.astype(np.uint8) * 255)
        if overlays:
            if self.pixel is None:
                low, high = float(full.min()), float(full.min() + full.max()) / 2
            else:
                low = self.median if self.median is not None else float(full.min())
                high = self.pixel
            bgr = cv2.cvtColor(
                original, cv2.COLOR_GRAY2BGR if original.shape[2] == 1 else cv2.COLOR_RGB2BGR
            )
            blended = cv2.addWeighted(bgr, 0.55, heat_colours(full, low, high), 0.45, 0)
            if above is not None:
                contours, _ = cv2.findContours(
                    above.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
                )
                cv2.drawContours(blended, contours, -1, (255, 255, 255), 1)
            self.save(self.target(OVERLAYS, path), blended)
        return float("nan") if above is None else float(above.mean())
