"""Embedded default data: a small MVTec-layout dataset generated deterministically on first use.

Categories: `texture` (a woven, noisy surface), `object` (a bottle seen from above, with a
little jitter) and `tile` (a grayscale surface, to exercise the 1->3 channel path). Defects
are visible: scratches, spots, and missing parts / cuts, each with a pixel mask.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from ad_lightning.data.datamodule import AnomalyDataModule

VERSION = 1
SIZE = 128
CATEGORIES = ("texture", "object", "tile")
COUNTS = {"train": 48, "test_good": 16, "per_defect": 8}


def default_root() -> Path:
    cache = os.environ.get("AD_LIGHTNING_CACHE") or Path.home() / ".cache" / "ad_lightning"
    return Path(cache) / f"synthetic_v{VERSION}"


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    coarse = rng.random((size // scale + 2, size // scale + 2)).astype(np.float32)
    img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    return np.asarray(img, np.float32) / 255.0


def _texture(rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 2)
    weave = 0.5 + 0.25 * np.sin(xx / 3.0 + phase[0]) * np.sin(yy / 3.0 + phase[1])
    gray = 0.6 * weave + 0.25 * _smooth_noise(rng, SIZE, 16) + 0.05 * rng.random((SIZE, SIZE))
    tint = np.array([0.75, 0.55, 0.35]) * rng.uniform(0.95, 1.05)
    return np.clip(gray[..., None] * tint * 1.4, 0, 1)


def _tile(rng: np.random.Generator) -> np.ndarray:
    gray = 0.45 + 0.2 * _smooth_noise(rng, SIZE, 8) + 0.06 * rng.standard_normal((SIZE, SIZE))
    return np.clip(gray, 0, 1)[..., None]


def _object(rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    cy, cx = SIZE / 2 + rng.uniform(-2, 2, 2)
    r = np.hypot(yy - cy, xx - cx)
    img = np.zeros((SIZE, SIZE, 3), np.float32) + 0.08
    body = r < 44
    img[body] = [0.2, 0.45, 0.25]
    img[(r > 36) & body] = [0.35, 0.65, 0.4]
    img[r < 14] = [0.85, 0.85, 0.8]
    img += 0.02 * rng.standard_normal(img.shape)
    return np.clip(img, 0, 1)


def _line_mask(rng: np.random.Generator, center_box: tuple[int, int]) -> np.ndarray:
    lo, hi = center_box
    y0, x0 = rng.integers(lo, hi, 2)
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(30, 50)
    width = rng.uniform(1.5, 2.5)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    dy, dx = np.sin(angle), np.cos(angle)
    along = (yy - y0) * dy + (xx - x0) * dx
    across = -(yy - y0) * dx + (xx - x0) * dy
    return (np.abs(across) < width) & (np.abs(along) < length / 2)


def _blob_mask(rng: np.random.Generator, center_box: tuple[int, int]) -> np.ndarray:
    lo, hi = center_box
    y0, x0 = rng.integers(lo, hi, 2)
    ry, rx = rng.uniform(4, 9, 2)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    return ((yy - y0) / ry) ** 2 + ((xx - x0) / rx) ** 2 < 1


def _scratch(img: np.ndarray, rng: np.random.Generator, box: tuple[int, int]) -> np.ndarray:
    mask = _line_mask(rng, box)
    img[mask] = 0.95 if rng.random() < 0.5 else 0.02
    return mask


def _spot(img: np.ndarray, rng: np.random.Generator, box: tuple[int, int]) -> np.ndarray:
    mask = _blob_mask(rng, box)
    color = rng.choice([[0.05, 0.05, 0.05], [0.6, 0.1, 0.6], [0.1, 0.2, 0.8]])
    img[mask] = color[: img.shape[2]] if img.shape[2] == 3 else color.mean()
    return mask


def _cut(img: np.ndarray, rng: np.random.Generator, box: tuple[int, int]) -> np.ndarray:
    """A missing part: a wedge cut out of the object, or a smeared square on a surface."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    if box == (40, 88):  # object: remove a sector of the bottle body
        theta = np.arctan2(yy - SIZE / 2, xx - SIZE / 2)
        start = rng.uniform(-np.pi, np.pi - 0.6)
        r = np.hypot(yy - SIZE / 2, xx - SIZE / 2)
        mask = (theta > start) & (theta < start + 0.6) & (r > 20) & (r < 46)
        img[mask] = 0.08
        return mask
    y0, x0 = rng.integers(box[0], box[1] - 14, 2)
    mask = np.zeros((SIZE, SIZE), bool)
    mask[y0 : y0 + 14, x0 : x0 + 14] = True
    img[mask] = img[mask].mean(axis=0)
    return mask


GENERATORS: dict[str, tuple[Callable[[np.random.Generator], np.ndarray], tuple[int, int]]] = {
    "texture": (_texture, (16, 112)),
    "object": (_object, (40, 88)),
    "tile": (_tile, (16, 112)),
}
DEFECTS = {"scratch": _scratch, "spot": _spot, "cut": _cut}


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (np.clip(arr, 0, 1) * 255).astype(np.uint8)
    Image.fromarray(data[..., 0] if data.shape[-1] == 1 else data).save(path)


def _write_category(out: Path, category: str, seed: int) -> None:
    make, box = GENERATORS[category]
    rng = np.random.default_rng([seed, CATEGORIES.index(category)])
    for i in range(COUNTS["train"]):
        _save(make(rng), out / category / "train" / "good" / f"{i:03d}.png")
    for i in range(COUNTS["test_good"]):
        _save(make(rng), out / category / "test" / "good" / f"{i:03d}.png")
    for defect, apply in DEFECTS.items():
        for i in range(COUNTS["per_defect"]):
            img = make(rng)
            mask = apply(img, rng, box)
            _save(img, out / category / "test" / defect / f"{i:03d}.png")
            _save(
                mask[..., None].astype(np.float32),
                out / category / "ground_truth" / defect / f"{i:03d}_mask.png",
            )


def make_synthetic_dataset(root: str | Path | None = None, seed: int = 0) -> Path:
    """Generate the dataset once into `root` (default: the user cache); return the folder.

    Written to a temporary folder and renamed, so concurrent jobs of a multirun never see a
    half-written dataset.
    """
    root = Path(root) if root else default_root()
    if (root / "DONE").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=root.parent))
    try:
        for category in CATEGORIES:
            _write_category(tmp, category, seed)
        (tmp / "DONE").write_text(f"synthetic v{VERSION} seed {seed}\n")
        try:
            tmp.rename(root)
        except OSError:  # another process finished first
            if not (root / "DONE").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


class SyntheticDataModule(AnomalyDataModule):
    """The embedded default data (`data=synthetic`): generated on first use, then read as a folder."""

    def __init__(self, root: str | None = None, category: str = "texture", **kwargs) -> None:
        super().__init__(root=str(root or default_root()), category=category, **kwargs)

    def prepare_data(self) -> None:
        make_synthetic_dataset(self.root)

    def setup(self, stage: str | None = None) -> None:
        make_synthetic_dataset(self.root)
        super().setup(stage)
