"""AUPRO: the area under the per-region overlap curve up to a false-positive rate (MVTec AD,
Bergmann et al. 2021), computed exactly.

Pixel AUROC weighs every defect pixel alike, so one large defect outweighs many small ones;
PRO averages the recall per ground-truth region, so a small scratch counts as much as a big
stain. Definitions (every comparison is `map >= t`):

- regions: the 8-connected components (`cv2.connectedComponents(connectivity=8)`, as MVTec's
  reference code labels with a 3 x 3 structuring element) of each image's mask;
- PRO(t): the mean over all regions of all images of the fraction of the region's pixels with
  map >= t;
- FPR(t): the fraction of normal pixels (mask false, over all images) with map >= t;
- AUPRO: the PRO-vs-FPR curve, one point per distinct map value plus (0, 0), integrated by
  trapezoids from FPR 0 to `fpr_limit` (PRO interpolated linearly at the limit) and divided by
  `fpr_limit`, so a perfect map scores 1.

Tied map values are one threshold, hence one curve point (a tie never makes intermediate
points, which would depend on the order of the tied pixels). The curve comes from one sort and
cumulative sums of per-pixel weights (1 / n_normal to FPR, 1 / (region size x n_regions) to
PRO): exact and vectorised. Only the pixels at or above the first threshold past the limit
are sorted, found by a selection on the normal pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
import torch


def region_labels(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The 8-connected components of a boolean mask [H, W]: labels (0 = normal, 1..n) and n."""
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    return labels, n - 1


def _split(
    maps: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normal pixels' scores, and defect pixels' scores with their PRO weights (float64)."""
    if len(maps) != len(masks):
        raise ValueError(f"aupro: {len(maps)} maps but {len(masks)} masks")
    normal, defect, share = [], [], []
    n_regions = 0
    for i, (anomaly_map, mask) in enumerate(zip(maps, masks, strict=True)):
        if anomaly_map.shape != mask.shape or anomaly_map.dim() != 2:
            raise ValueError(
                f"aupro: image {i} has map {tuple(anomaly_map.shape)} and mask "
                f"{tuple(mask.shape)}; both must be the same [H, W]"
            )
        scores = anomaly_map.detach().cpu().float()
        if torch.isnan(scores).any():
            raise ValueError(f"aupro: the map of image {i} holds NaN")
        labels, n = region_labels(mask.detach().cpu().bool().numpy())
        labels_t = torch.from_numpy(labels)
        normal.append(scores[labels_t == 0])
        if n:
            inside = labels_t > 0
            sizes = torch.bincount(labels_t[inside].flatten(), minlength=n + 1).double()
            defect.append(scores[inside])
            share.append(1.0 / sizes[labels_t[inside]])
            n_regions += n
    if not n_regions:
        raise ValueError("aupro: the masks hold no defect region")
    normal_t = torch.cat(normal)
    if not normal_t.numel():
        raise ValueError("aupro: the masks hold no normal pixel")
    return normal_t, torch.cat(defect), torch.cat(share) / n_regions


def aupro(
    maps: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], fpr_limit: float = 0.3
) -> float:
    """Normalised area under the PRO curve for FPR in [0, fpr_limit] (1 for a perfect map).

    maps: one float map [H, W] per image; masks: the matching bool masks (images may differ
    in size). Raises ValueError when the masks hold no defect region or no normal pixel (the
    curve is undefined), a map holds NaN, or fpr_limit is not in (0, 1].
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"aupro: fpr_limit={fpr_limit} must be in (0, 1]")
    normal, defect, share = _split(maps, masks)
    n_normal = normal.numel()
    # Every point with FPR <= limit has a threshold above the (k+1)-th largest normal score,
    # and the point at that score is past the limit (one spare rank guards rounding of k):
    # pixels below it cannot change the area.
    k = math.floor(fpr_limit * n_normal) + 2
    if k <= n_normal:
        cut = torch.kthvalue(normal, n_normal - k + 1).values
        normal = normal[normal >= cut]
        keep = defect >= cut
        defect, share = defect[keep], share[keep]
    scores = torch.cat([normal, defect])
    is_normal = torch.cat(
        [
            torch.ones(normal.numel(), dtype=torch.int64),
            torch.zeros(defect.numel(), dtype=torch.int64),
        ]
    )
    pro_weight = torch.cat([torch.zeros(normal.numel(), dtype=torch.float64), share])
    scores, order = torch.sort(scores, descending=True)
    # the last pixel of each run of tied scores closes that threshold's point
    ends = torch.nonzero(scores[1:] != scores[:-1]).flatten()
    ends = torch.cat([ends, torch.tensor([scores.numel() - 1])])
    fpr = torch.cumsum(is_normal[order], 0)[ends].double() / n_normal
    pro = torch.cumsum(pro_weight[order], 0)[ends]
    zero = torch.zeros(1, dtype=torch.float64)
    return _area(torch.cat([zero, fpr]).numpy(), torch.cat([zero, pro]).numpy(), fpr_limit)


def _area(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """Trapezoid area of the curve (fpr nondecreasing, from 0) up to `limit`, over `limit`."""
    inside = int(np.searchsorted(fpr, limit, side="right"))  # points with fpr <= limit
    x, y = fpr[:inside], pro[:inside]
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))
    if inside < len(fpr) and x[-1] < limit:
        x0, x1, y0, y1 = x[-1], fpr[inside], y[-1], pro[inside]
        y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (limit - x0) * (y0 + y_limit) / 2
    return area / limit
