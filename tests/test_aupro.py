"""AUPRO against a brute-force reference written as literally as the definition (MVTec AD,
Bergmann et al. 2021): a threshold per distinct map value, regions found by flood fill."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ad_lightning.metrics.aupro import aupro

NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def flood_regions(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected regions of a boolean mask, one boolean array each, by flood fill."""
    seen = np.zeros_like(mask)
    regions = []
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        region = np.zeros_like(mask)
        stack = [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            region[cy, cx] = True
            for dy, dx in NEIGHBOURS:
                ny, nx = cy + dy, cx + dx
                inside = 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1]
                if inside and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        regions.append(region)
    return regions


def brute_force_aupro(maps: list[np.ndarray], masks: list[np.ndarray], limit: float) -> float:
    regions = [(i, r) for i, mask in enumerate(masks) for r in flood_regions(mask)]
    n_normal = sum(int((~mask).sum()) for mask in masks)
    values = {float(v) for m in maps for v in m.flatten()} | {float("inf")}
    curve = []
    for t in sorted(values, reverse=True):
        false_pos = sum(int(((m >= t) & ~k).sum()) for m, k in zip(maps, masks, strict=True))
        overlaps = [(maps[i][r] >= t).sum() / r.sum() for i, r in regions]
        curve.append((false_pos / n_normal, float(np.mean(overlaps))))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(curve[:-1], curve[1:], strict=True):
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        elif x0 < limit:
            y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_limit) / 2
    return area / limit


def random_case(seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """3-5 small images of two sizes: blob masks (rectangles, specks, diagonal touches, some
    images defect-free), scores a little higher on defects, rounded so that many tie."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for i in range(rng.integers(3, 6)):
        h, w = (12, 15) if i % 2 == 0 else (9, 11)
        mask = np.zeros((h, w), dtype=bool)
        if i != 1:  # image 1 is defect-free
            for _ in range(rng.integers(1, 4)):
                y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
                dy, dx = rng.integers(1, 5), rng.integers(1, 6)
                mask[y : y + dy, x : x + dx] = True
            mask |= rng.random((h, w)) < 0.03
        score = rng.random((h, w)) + 0.4 * mask
        maps.append(np.round(score, 1 if seed % 2 else 2))
        masks.append(mask)
    return maps, masks


def torch_aupro(maps: list[np.ndarray], masks: list[np.ndarray], limit: float) -> float:
    return aupro(
        [torch.from_numpy(m).float() for m in maps], [torch.from_numpy(k) for k in masks], limit
    )


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_aupro_matches_brute_force_on_random_maps(seed: int, limit: float) -> None:
    maps, masks = random_case(seed)
    maps = [m.astype(np.float32) for m in maps]  # the same values aupro sees
    assert torch_aupro(maps, masks, limit) == pytest.approx(
        brute_force_aupro(maps, masks, limit), abs=1e-9
    )


def test_aupro_perfect_map_is_one_and_inverted_map_is_zero() -> None:
    _, masks = random_case(0)
    perfect = [k.astype(np.float32) for k in masks]
    inverted = [1 - p for p in perfect]
    assert torch_aupro(perfect, masks, 0.3) == pytest.approx(1.0, abs=1e-12)
    assert torch_aupro(inverted, masks, 0.3) == pytest.approx(0.0, abs=1e-12)


def test_pro_averages_per_region_not_per_pixel() -> None:
    """A big region found and a small one missed: PRO starts at 0.5 (pixel recall 100/104)
    and rises linearly to 1 at FPR 1, so the area to 0.3 is (0.5 + 0.65) / 2."""
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:12, 2:12] = True  # 100 pixels
    mask[16:18, 16:18] = True  # 4 pixels
    score = np.zeros((20, 20), dtype=np.float32)
    score[2:12, 2:12] = 1.0
    assert torch_aupro([score], [mask], 0.3) == pytest.approx(0.575, abs=1e-12)
    assert brute_force_aupro([score], [mask], 0.3) == pytest.approx(0.575, abs=1e-12)


def test_regions_are_8_connected() -> None:
    """Two diagonally touching pixels are one region (MVTec labels with a 3 x 3 structure): one
    of them found and a third, separate pixel missed starts PRO at (1/2 + 0) / 2 = 0.25
    (4-connectivity would make three regions and start at 1/3)."""
    mask = np.zeros((8, 8), dtype=bool)
    mask[1, 1] = mask[2, 2] = mask[6, 6] = True
    score = np.zeros((8, 8), dtype=np.float32)
    score[1, 1] = 1.0
    expected = (0.25 + (0.25 + 0.75 * 0.3)) / 2
    assert torch_aupro([score], [mask], 0.3) == pytest.approx(expected, abs=1e-12)


def test_fpr_limit_changes_the_area_as_the_brute_force_says() -> None:
    maps, masks = random_case(3)
    maps = [m.astype(np.float32) for m in maps]
    full, early = torch_aupro(maps, masks, 1.0), torch_aupro(maps, masks, 0.3)
    assert full == pytest.approx(brute_force_aupro(maps, masks, 1.0), abs=1e-9)
    assert early == pytest.approx(brute_force_aupro(maps, masks, 0.3), abs=1e-9)
    assert abs(full - early) > 0.01


def test_aupro_rejects_undefined_curves() -> None:
    normal = np.zeros((4, 4), dtype=bool)
    score = np.random.default_rng(0).random((4, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="no defect region"):
        torch_aupro([score], [normal], 0.3)
    with pytest.raises(ValueError, match="no normal pixel"):
        torch_aupro([score], [~normal], 0.3)
    with pytest.raises(ValueError, match="fpr_limit"):
        torch_aupro([score], [normal], 0.0)
