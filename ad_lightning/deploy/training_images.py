"""What a model's training images were (size, mode, bit depth), kept in its model file.

Predict converts every input to the model's input (resized, colour-converted, scaled to 8
bits), so a whole batch from another camera (all 16-bit, all grayscale, another resolution)
would be scored without a word: the odd-image check (data/audit.py) compares the inputs only
with each other. The run records its training images' majority facts by audit.py's rules (a
size held by DOMINANT_SHARE of them, else the median size, a side SIZE_FACTOR off it being
odd), and predict names each input that differs from them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from statistics import median
from typing import Any

from ad_lightning.data.audit import DOMINANT_SHARE, far_off, majority
from ad_lightning.data.io import ImageInfo


@dataclass(frozen=True)
class TrainingImages:
    """The majority size, mode and bit depth of the images a model was trained on, as stored
    (before conversion), which the line's images should share."""

    images: int  # how many were read
    size: str | None  # "WxH" held by at least DOMINANT_SHARE of them; None: sizes vary
    median_size: tuple[float, float]  # median width and height
    mode: str  # PIL mode as stored (RGB, L, I;16, ...)
    bits: int  # bits per sample as stored

    @classmethod
    def of(cls, infos: Iterable[ImageInfo]) -> TrainingImages | None:
        """The majority facts of `infos`, as audit.py finds the majority (None: no images)."""
        infos = list(infos)
        if not infos:
            return None
        size, n_size = majority([i.size for i in infos])
        return cls(
            len(infos),
            size if n_size >= DOMINANT_SHARE * len(infos) else None,
            (float(median(i.width for i in infos)), float(median(i.height for i in infos))),
            majority([i.mode for i in infos])[0],
            int(majority([str(i.bits) for i in infos])[0]),
        )

    @classmethod
    def from_record(cls, record: Any) -> TrainingImages | None:
        """Rebuilt from a model file's record; None when there is none (a file written before
        it was recorded) or it is malformed (a model file from elsewhere is data)."""
        if not isinstance(record, dict):
            return None
        try:
            width, height = record["median_size"]
            size = record["size"]
            if size is not None and not re.fullmatch(r"\d+x\d+", str(size)):
                return None
            return cls(
                int(record["images"]),
                None if size is None else str(size),
                (float(width), float(height)),
                str(record["mode"]),
                int(record["bits"]),
            )
        except (KeyError, TypeError, ValueError, OverflowError):
            return None

    def describe(self) -> str:
        """What the model was trained on, for a warning."""
        width, height = self.median_size
        size = f"{self.size} px" if self.size else f"sizes around {width:g}x{height:g} px"
        return f"{size}, mode {self.mode}, {self.bits}-bit ({self.images} images)"

    def differences(self, info: ImageInfo) -> list[str]:
        """How an image differs from the training images, by audit.py's rules: another size
        than the majority's (when sizes vary, a side SIZE_FACTOR off the median), another
        mode, another bit depth; [] when it is like them."""
        why = []
        width, height = self.median_size

        if self.size is not None and info.size != self.size:
            why.append(f"{info.size} px, trained on {self.size} px")
        elif self.size is None and (far_off(info.width, width) or far_off(info.height, height)):
            why.append(
                f"{info.size} px, far from the training images' median {width:g}x{height:g} "
                "(their sizes vary)"
            )
        if info.mode != self.mode:
            why.append(f"mode {info.mode}, trained on {self.mode}")
        if info.bits != self.bits:
            why.append(f"{info.bits}-bit, trained on {self.bits}-bit")
        return why
