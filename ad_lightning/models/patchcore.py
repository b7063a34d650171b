"""PatchCore (Roth et al. 2022, "Towards Total Recall in Industrial Anomaly Detection").

Fit, one pass over the normal images (Sec. 3.1-3.2): mid-level features (backbone blocks
at strides 8 and 16, resized to the stride-8 grid and concatenated) are averaged over a
3x3 neighbourhood, so that each patch feature describes its surroundings and not one
receptive field alone. All patches of all training images would make a bank too large to
search, so k-center greedy coreset selection keeps 1 % of them: adding, again and again,
the patch farthest from those already kept covers the feature space with the fewest
patches. The selection measures distances after a random Gaussian projection
(Johnson-Lindenstrauss), which keeps them approximately at a fraction of the cost.

Scoring (Sec. 3.3): a test patch's score is its L2 distance to the nearest bank patch
(exact faiss search). The image score is the largest patch score, optionally reweighted by
how isolated that nearest bank patch is among its own neighbours (Eq. 7); the map is the
patch scores upsampled bilinearly to the image and smoothed with a Gaussian (sigma = 4 px).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from ad_lightning.backbones.features import FeatureExtractor
from ad_lightning.checks import choice
from ad_lightning.models.base import Scores
from ad_lightning.models.families.statistics import ResizableBuffers, StatisticsModule
from ad_lightning.nn.smoothing import upsample_and_smooth
from ad_lightning.precision import full_precision

log = logging.getLogger(__name__)
SCORES = ("max_patch", "map_max")


def random_projection(features: torch.Tensor, dim: int, generator: torch.Generator) -> torch.Tensor:
    """[N, C] -> [N, dim] by a Gaussian matrix scaled by 1/sqrt(dim), which keeps distances
    in expectation; dim <= 0 or >= C returns the features unchanged (nothing to gain)."""
    channels = features.shape[1]
    if dim <= 0 or dim >= channels:
        return features
    matrix = torch.randn(channels, dim, generator=generator) / math.sqrt(dim)
    return features @ matrix.to(features)


@torch.no_grad()
def k_center_greedy(
    points: torch.Tensor, n: int, start: int = 0, shortlist: int = 8192, chunk: int = 16384
) -> torch.Tensor:
    """Indices of `n` distinct rows of `points` [N, D] chosen by farthest-point selection.

    Each step adds the point farthest (squared L2) from those chosen so far, beginning with
    `start`. Updating every point's distance after every step reads all points once per
    centre, a memory-bound loop (~30 s for 1 % of 200k patches on one core). Here the new
    centres' distances reach all points in batches, one matrix product per batch, and in
    between the search runs on a shortlist of the points that were farthest at the last
    batch update. A point's distance only shrinks as centres are added, so no point outside
    the shortlist can be farther than the shortlist's last entry was: while the shortlist's
    best is at least that far, it is the farthest point overall. Same selection as the
    step-by-step loop (up to ties), about 10x faster.
    """
    total = len(points)
    if n < 1:
        raise ValueError(f"k_center_greedy: n={n} must be >= 1")
    if n >= total:
        return torch.arange(total, device=points.device)
    x = points.float().contiguous()
    sq_norms = x.square().sum(1)
    min_dist = torch.full((total,), float("inf"), device=x.device)
    selected = torch.empty(n, dtype=torch.long, device=x.device)
    selected[0] = start
    chosen, applied = 1, 0
    while chosen < n:
        # batch update: distances of all points to the centres chosen since the last one
        centres = selected[applied:chosen]
        c, c_sq = x[centres], sq_norms[centres]
        for lo in range(0, total, chunk):
            part = slice(lo, lo + chunk)
            dist = (x[part] @ c.T).mul_(-2).add_(sq_norms[part, None]).add_(c_sq)
            torch.minimum(min_dist[part], dist.amin(1).clamp_min_(0), out=min_dist[part])
        applied = chosen
        min_dist[selected[:chosen]] = -1.0  # never chosen twice, even among duplicate points
        size = min(shortlist, total)
        near_dist, near = torch.topk(min_dist, size)
        bound = float(near_dist[-1]) if size < total else -math.inf
        x_near, sq_near, dist_near = x[near], sq_norms[near], near_dist.clone()
        while chosen < n:
            j = torch.argmax(dist_near)
            if float(dist_near[j]) < bound:
                break  # a point outside the shortlist may be farther: update all points
            idx = near[j]
            selected[chosen] = idx
            chosen += 1
            step = torch.addmv(sq_near, x_near, x[idx], alpha=-2).add_(sq_norms[idx])
            torch.minimum(dist_near, step.clamp_min_(0), out=dist_near)
            dist_near[j] = -1.0
    return selected


def coreset_indices(
    features: torch.Tensor, ratio: float, projection: int, seed: int = 0
) -> torch.Tensor:
    """Rows of `features` [N, C] that k-center greedy keeps: ceil(ratio * N) of them, searched
    on a random projection to `projection` dimensions, from a seeded random first row."""
    n = max(1, math.ceil(ratio * len(features)))
    if n >= len(features):
        return torch.arange(len(features), device=features.device)
    generator = torch.Generator().manual_seed(seed)
    points = random_projection(features.float(), projection, generator)
    start = int(torch.randint(len(points), (1,), generator=generator))
    return k_center_greedy(points, n, start)


class PatchCore(StatisticsModule, ResizableBuffers):
    """Memory bank of neighbourhood-aggregated patch features; score = nearest-patch distance."""

    score_names = SCORES

    def __init__(
        self,
        backbone: FeatureExtractor,
        neighbourhood: int = 3,
        coreset_ratio: float = 0.01,
        coreset_projection: int = 128,
        num_neighbours: int = 9,
        reweight: bool = False,
        sigma: float = 4.0,
        score: str = "max_patch",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        if neighbourhood < 1 or neighbourhood % 2 == 0:
            raise ValueError(
                f"model.neighbourhood={neighbourhood}: use an odd size >= 1 (the paper's 3) so the feature grid keeps its size"
            )
        if not 0 < coreset_ratio <= 1:
            raise ValueError(f"model.coreset_ratio={coreset_ratio} must be in (0, 1]")
        if reweight and num_neighbours < 2:
            raise ValueError(
                f"model.num_neighbours={num_neighbours}: reweighting compares the nearest bank patch with its neighbours; use >= 2 (the paper's b = 9)"
            )
        self.primary_score = choice("model.score", score, SCORES)
        self.backbone = backbone
        self.neighbourhood = neighbourhood
        self.coreset_ratio = coreset_ratio
        self.coreset_projection = coreset_projection
        self.num_neighbours = num_neighbours
        self.reweight = reweight
        self.sigma = sigma
        self.seed = seed
        self.register_buffer("memory_bank", torch.empty(0, 0))
        self._index: faiss.IndexFlatL2 | None = None  # cache rebuilt from memory_bank

    def describe(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone.describe(),
            "n_bank_patches": len(self.memory_bank),
            "coreset_ratio": self.coreset_ratio,
            "coreset_projection": self.coreset_projection,
            "neighbourhood": self.neighbourhood,
            "reweight": self.reweight,
        }

    def _on_buffers_loaded(self) -> None:
        self._index = None

    # ---- features -----------------------------------------------------------------
    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, C, h, w]: backbone blocks, each averaged over its neighbourhood."""
        features = self.backbone(images).float()
        if self.neighbourhood == 1:
            return features
        # zero padding counted, as the paper's aggregation does: border patches stay comparable
        # between training and test because both see the same padding
        return F.avg_pool2d(features, self.neighbourhood, stride=1, padding=self.neighbourhood // 2)

    def collect(self, batch: dict[str, Any]) -> torch.Tensor:
        """[B, h*w, C]: every patch feature of every training image (fp32)."""
        return self.patch_features(batch["image"]).flatten(2).transpose(1, 2)

    def finalise(self, rows: torch.Tensor) -> None:
        patches = rows.reshape(-1, rows.shape[-1]).float()
        start = time.perf_counter()
        keep = coreset_indices(patches, self.coreset_ratio, self.coreset_projection, self.seed)
        self.memory_bank = patches[keep].contiguous()
        self._index = None
        log.info(
            "PatchCore: memory bank of %d of %d training patches (%.1f s coreset selection)",
            len(keep),
            len(patches),
            time.perf_counter() - start,
        )

    # ---- nearest neighbours ---------------------------------------------------------
    def index(self) -> faiss.IndexFlatL2:
        if self._index is None:
            if self.memory_bank.numel() == 0:
                raise RuntimeError("PatchCore is not fitted: run trainer.fit first")
            bank = np.ascontiguousarray(self.memory_bank.detach().float().cpu().numpy())
            self._index = faiss.IndexFlatL2(bank.shape[1])
            self._index.add(bank)
        return self._index

    def nearest(self, query: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """L2 distances [M, k] and bank indices [M, k] of the k nearest bank patches of query [M, C]."""
        k = min(k, len(self.memory_bank))
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return self.nearest_by_matmul(query, k)
        sq_dist, idx = self.index().search(
            np.ascontiguousarray(query.detach().float().cpu().numpy()), k
        )
        dist = torch.from_numpy(sq_dist).clamp_min_(0).sqrt_()
        return dist.to(query.device), torch.from_numpy(idx).to(query.device)

    def nearest_by_matmul(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The same exact search in torch operations: what an exported ONNX graph holds
        (faiss is a library call a graph cannot contain)."""
        with full_precision(query.device):  # squared norms minus a product: fp32 or nothing
            query, bank = query.float(), self.memory_bank.to(query.device).float()
            sq_dist = (
                query.square().sum(1, keepdim=True) - 2 * query @ bank.T + bank.square().sum(1)
            )
        sq_dist, idx = torch.topk(sq_dist, k, dim=1, largest=False)
        return sq_dist.clamp_min(0).sqrt(), idx

    def reweighting(
        self, patches: torch.Tensor, patch_scores: torch.Tensor, nearest: torch.Tensor
    ) -> torch.Tensor:
        """Eq. 7: 1 - softmax weight of the worst patch's distance to its nearest bank patch m*
        among its distances to m*'s own neighbourhood in the bank. An m* far from other bank
        patches (a rare normal appearance) leaves the score almost whole; an m* in a dense
        region lowers it."""
        rows = torch.arange(len(patches), device=patches.device)
        worst = patch_scores.argmax(1)
        test_patch = patches[rows, worst]  # [B, C]
        m_star = nearest[rows, worst]  # [B]
        _, support = self.nearest(self.memory_bank[m_star], self.num_neighbours)  # m* first
        dist = torch.linalg.vector_norm(self.memory_bank[support] - test_patch[:, None], dim=2)
        return 1 - torch.exp(patch_scores[rows, worst] - torch.logsumexp(dist, dim=1))

    def score(self, batch: dict[str, Any]) -> Scores:
        images = batch["image"]
        features = self.patch_features(images)
        b, c, h, w = features.shape
        patches = features.flatten(2).transpose(1, 2)  # [B, h*w, C]
        dist, idx = self.nearest(patches.reshape(-1, c), 1)
        patch_scores, nearest = dist.view(b, h * w), idx.view(b, h * w)
        image_score = patch_scores.amax(1)
        if self.reweight:
            image_score = image_score * self.reweighting(patches, patch_scores, nearest)
        anomaly_map = upsample_and_smooth(
            patch_scores.view(b, h, w), tuple(images.shape[-2:]), self.sigma
        )
        return Scores(
            image={"max_patch": image_score, "map_max": anomaly_map.flatten(1).amax(1)},
            map=anomaly_map,
        )
