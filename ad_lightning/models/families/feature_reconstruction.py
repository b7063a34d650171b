"""The feature-reconstruction family (Skip-DFR, DFR): reconstruct frozen deep features, score by
the residual.

FE(x) is the concatenation of the chosen backbone blocks; an autoencoder AE learns
AE(FE(x)) ~ FE(x) on normal images with an L2 loss. The residual map is the per-position
distance between AE(FE(x)) and FE(x), upsampled to the image; image scores reduce it.

Three choices make the residual hold on real data, each a config key:
- `standardize`: features are standardised per channel with training statistics, so the
  deepest block (largest values) does not own the loss and the distance;
- `distance`: `l2` (the papers), `cosine`, which ignores the overall feature magnitude
  that varies with texture contrast and keeps the direction that defects change, or
  `combined`, both normalised on normal validation images (set before testing, see
  `distance_norm`) and joined (`distance_combine`): on our three real categories neither
  alone holds on all (l2 fails on tire, cosine on magnetic tile; experiments/benchmark);
- `sigma`: Gaussian smoothing of the upsampled map (input pixels) before the image score;
- `distance_norm` (with `combined`): what each part is divided by, its `mean` over the normal
  validation maps, or its `tail` spread there, q0.995 - q0.9 of the upsampled, smoothed maps,
  after subtracting q0.9 (EfficientAD's quantile map normalisation, arXiv 2303.14535): a max
  score lives in the tail of the normal residuals, which the mean does not measure
  (experiments/skip_dfr/README.md);
- `distance_combine` (with `combined`): the normalised parts' `sum`, or their `max`, which
  flags a position where either part leaves its normal range; with `tail` both parts are in
  units of their own normal tail, so the larger is the more unusual (item 21 there);
- `pixel_distance` (null = `distance`): the heat map's own distance, from the same AE pass.
  `l2_whitened` is the L2 of the residual with each channel divided by its root mean square
  over the normal validation residuals, so that channels the AE cannot predict on normal
  images (texture grain) do not drown those it can; the cosine part, which makes the image
  score hold on tire, is noisy per pixel (experiments/skip_dfr/README.md, item 20);
- `pixel_pool` (1 = off): the heat map's residual is averaged over k x k neighbours before
  its (`l2` or `l2_whitened`) distance, whitened by the RMS of the residual so averaged:
  grain that the AE cannot predict is zero-mean noise and averages out, a defect's coherent
  deviation does not (PatchCore's neighbourhood aggregation applied to the residual; item 25
  there);
- `global_weight` (opt-in, 0 = off): adds a global branch for logical anomalies, the
  Mahalanobis distance of the image's pooled features (families/global_branch.py, PUAD),
  z-scored on the normal validation images, to every image score (the map is unchanged):
  it helped on magnetic tile and sank an unseen category (issue 20), so it is off by default;
- `global_source` (with `global_weight`): what that branch pools, the `features` (fitted on
  the training images before training) or the AE's `residual` (fitted on the training images'
  residuals after training, at test start): the residual's pooled mean and magnitude see a
  faint deviation spread over an area, which a map's max does not (item 30 there).

Because FE is frozen, training reads features computed once per image from a
`FeatureStore` (backbones/feature_store.py) when the batch carries them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ad_lightning.backbones.features import FeatureExtractor
from ad_lightning.checks import choice
from ad_lightning.models.base import AnomalyModule, Scores
from ad_lightning.models.families.global_branch import (
    GLOBAL_SOURCES,
    fit_global_gaussian,
    global_descriptor,
    global_distance,
    residual_descriptor,
)
from ad_lightning.models.families.training_images import normal_images, training_images
from ad_lightning.nn.buffers import buffers_from_state
from ad_lightning.nn.flops import flops_per_image
from ad_lightning.nn.smoothing import upsample_and_smooth
from ad_lightning.precision import scoring_context

log = logging.getLogger(__name__)

SCORE_REDUCTIONS = ("max", "mean", "top1pct")
DISTANCES = ("l2", "cosine", "combined", "l2_whitened")
#: how `combined` joins its two normalised parts
COMBINES = ("sum", "max")
DISTANCE_NORMS = ("mean", "tail")
#: quantiles of the normal validation maps whose spread `distance_norm=tail` divides by
TAIL_QUANTILES = (0.9, 0.995)
#: pixels sampled per validation map for those quantiles
TAIL_PIXELS_PER_MAP = 16384
#: floor of a channel's residual RMS, relative to the median channel's: a channel the AE
#: predicts almost exactly on normal images must not weigh a million times the others
RESIDUAL_RMS_FLOOR = 1e-3
#: buffers added after the first files were written: a file without them loads with the unit
#: scale, no shift and the unit std, which score as such files always did
LATE_BUFFERS = (
    "distance_shift",
    "pixel_distance_scale",
    "pixel_distance_shift",
    "residual_std",
    "residual_std_fitted",
    "residual_std_pool",
)
#: the global branch's buffers: empty until fitted, sized by what a state dict holds, filled
#: in when a state dict lacks them (files written before the branch load with it off)
GLOBAL_BUFFERS = ("global_mean", "global_std", "global_precision", "global_val", "score_val_std")
#: those of them fitted on normal validation images, through the AE
GLOBAL_VALIDATION = ("global_val", "score_val_std")
#: training images whose pooled descriptors are standardised per chunk (bounds the memory)
GLOBAL_CHUNK = 64


def reduce_map(residual: torch.Tensor, how: str) -> torch.Tensor:
    """Image score from a map [B, H, W]: max, mean, or mean of the top 1 % positions."""
    flat = residual.flatten(1)
    if how == "max":
        return flat.amax(1)
    if how == "mean":
        return flat.mean(1)
    if how == "top1pct":
        k = max(1, flat.shape[1] // 100)
        return flat.topk(k, dim=1).values.mean(1)
    raise ValueError(f"unknown score reduction {how!r}; use max, mean or top1pct")


def residual_distance(
    reconstruction: torch.Tensor,
    features: torch.Tensor,
    how: str,
    scale: torch.Tensor | None = None,
    channel_std: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    combine: str = "sum",
) -> torch.Tensor:
    """Per-position distance over channels, [B, C, h, w] x 2 -> [B, h, w].

    `combined` normalises its parts, (l2 - shift[0]) / scale[0] and (cosine - shift[1]) /
    scale[1], with their statistics on normal images, so that neither dominates, and joins
    them by `combine`: their sum, or their max (either part anomalous). L2 catches changes of
    feature magnitude (dark blowholes on a grey tile), cosine changes of pattern at equal
    magnitude (tire tread). `l2_whitened` is the L2 of the residual with channel c divided by
    channel_std[c] (its root mean square on normal images).
    """
    if how == "l2":
        return (reconstruction - features).pow(2).sum(1).sqrt()
    if how == "l2_whitened":
        if channel_std is None:
            raise ValueError("distance l2_whitened needs the residual's channel_std")
        std = channel_std.to(features.device)[:, None, None]
        return ((reconstruction - features) / std).pow(2).sum(1).sqrt()
    cosine = 1 - F.cosine_similarity(reconstruction, features, dim=1, eps=1e-6)
    if how == "cosine":
        return cosine
    l2 = (reconstruction - features).pow(2).sum(1).sqrt()
    scale = scale if scale is not None else torch.ones(2, device=features.device)
    shift = shift if shift is not None else torch.zeros(2, device=features.device)
    parts = [(l2 - shift[0]) / scale[0], (cosine - shift[1]) / scale[1]]
    return torch.maximum(*parts) if combine == "max" else parts[0] + parts[1]


class FeatureReconstructionModule(AnomalyModule):
    """Family base: an autoencoder over frozen backbone features, scored by the residual."""

    family = "feature_reconstruction"
    score_names = tuple(f"residual_{r}" for r in SCORE_REDUCTIONS)
    #: training and validation may read features from a FeatureStore (the backbone is frozen)
    reads_stored_features = True

    def __init__(
        self,
        backbone: FeatureExtractor,
        autoencoder: nn.Module | None,
        lr: float,
        score: str = "residual_max",
        distance: str = "l2",
        standardize: bool = False,
        sigma: float = 0.0,
        stats_images: int = 512,
        distance_norm: str = "mean",
        global_weight: float = 0.0,
        pixel_distance_norm: str | None = None,
        input_dropout: float = 0.0,
        pixel_distance: str | None = None,
        distance_combine: str = "sum",
        pixel_pool: int = 1,
        global_source: str = "features",
        global_images: int | None = None,
    ) -> None:
        super().__init__()
        if global_weight < 0:
            raise ValueError(f"model.global_weight={global_weight} must be >= 0 (0 = off)")
        if not 0 <= input_dropout < 1:
            raise ValueError(f"model.input_dropout={input_dropout} must be in [0, 1) (0 = off)")
        self.backbone = backbone
        self.autoencoder = autoencoder
        self.lr = lr
        self.primary_score = choice("model.score", score, self.score_names)
        self.distance = choice("model.distance", distance, DISTANCES)
        self.pixel_distance = (
            self.distance
            if pixel_distance is None
            else choice("model.pixel_distance", pixel_distance, DISTANCES)
        )
        self.distance_norm = choice("model.distance_norm", distance_norm, DISTANCE_NORMS)
        self.distance_combine = choice("model.distance_combine", distance_combine, COMBINES)
        self.pixel_distance_norm = (
            None
            if pixel_distance_norm is None
            else choice("model.pixel_distance_norm", pixel_distance_norm, DISTANCE_NORMS)
        )
        odd = isinstance(pixel_pool, int) and not isinstance(pixel_pool, bool) and pixel_pool % 2
        if not odd or pixel_pool < 1:
            raise ValueError(
                f"model.pixel_pool={pixel_pool!r} must be an odd integer >= 1 (1 = off)"
            )
        self.pixel_pool = pixel_pool
        if self.pixel_pool > 1 and (
            self.pixel_distance not in ("l2", "l2_whitened") or self.distance == "l2_whitened"
        ):
            raise ValueError(
                f"model.pixel_pool={pixel_pool} averages the heat map's residual before its "
                "distance, which needs model.pixel_distance l2 or l2_whitened and an image "
                f"distance other than l2_whitened (got pixel_distance={self.pixel_distance}, "
                f"distance={self.distance}): set model.pixel_pool=1 or change those keys"
            )
        self.standardize = standardize
        self.sigma = float(sigma)
        self.stats_images = stats_images
        self.global_weight = float(global_weight)
        self.global_source = choice("model.global_source", global_source, GLOBAL_SOURCES)
        if global_images is not None and global_images < 1:
            raise ValueError(f"model.global_images={global_images} must be >= 1 (null = all)")
        self.global_images = global_images
        self.input_dropout = float(input_dropout)
        # per-channel training statistics (identity until fitted); saved with the model
        self.register_buffer("feature_mean", torch.zeros(backbone.out_channels))
        self.register_buffer("feature_std", torch.ones(backbone.out_channels))
        # whether they were fitted (informational: every fit fits them; kept in the state
        # dict, which files written before every fit did so load strictly with)
        self.register_buffer("stats_fitted", torch.tensor(False))
        # mean l2 and cosine residual on normal validation images, for distance=combined (or
        # their tail: the spread q0.995 - q0.9 as the scale, q0.9 as the shift)
        self.register_buffer("distance_scale", torch.ones(2))
        self.register_buffer("distance_shift", torch.zeros(2))
        self.register_buffer("scale_fitted", torch.tensor(False))
        # the heat map's own scale when pixel_distance_norm differs (fitted with the above)
        self.register_buffer("pixel_distance_scale", torch.ones(2))
        self.register_buffer("pixel_distance_shift", torch.zeros(2))
        # per-channel RMS of the residual on normal validation images, for l2_whitened
        self.register_buffer("residual_std", torch.ones(backbone.out_channels))
        # its own flag: a file fitted before it existed has scale_fitted set but no std
        self.register_buffer("residual_std_fitted", torch.tensor(False))
        # the pixel_pool that std was fitted at (files before it: 1, unpooled, as they were)
        self.register_buffer("residual_std_pool", torch.tensor(1))
        # global branch (registered even when off, so a file with it on loads strictly):
        # descriptor mean and std [D] and Ledoit-Wolf precision [D, D] from training images
        # (D = 2C pooled features, 3C pooled residual);
        # the mean and std of its distance [2], and each image score's std [3], on normal
        # validation images
        for name in GLOBAL_BUFFERS:
            shape = (0, 0) if name == "global_precision" else (0,)
            self.register_buffer(name, torch.zeros(shape))
        # what a file lacking a late or global buffer loads as: the unfitted value, never what
        # this module was fitted to before (not registered: not saved)
        self._unfitted = {n: self._buffers[n].clone() for n in (*GLOBAL_BUFFERS, *LATE_BUFFERS)}
        self._input_hw: tuple[int, int] | None = None

    def describe(self) -> dict[str, Any]:
        facts: dict[str, Any] = {
            "backbone": self.backbone.describe(),
            "distance": self.distance,
            "distance_norm": self.distance_norm,
            "distance_combine": self.distance_combine,
            "pixel_distance": self.pixel_distance,
            "pixel_pool": self.pixel_pool,
            "standardize": self.standardize,
            "sigma": self.sigma,
        }
        if self.global_weight > 0:
            facts["global_weight"] = self.global_weight
            facts["global_source"] = self.global_source
            if self.global_source == "residual":
                facts["global_images"] = self.global_images
        if self._input_hw is not None and self.autoencoder is not None:
            facts["flops_per_image"] = self.flops()
        return facts

    def flops(self) -> dict[str, int]:
        """Forward FLOPs per image of the backbone and of the AE, at the input size scored."""
        device = self.feature_mean.device
        image = torch.zeros(1, 3, *self._input_hw, device=device)
        feats = self.backbone(image)
        return {
            "backbone": flops_per_image(self.backbone, image),
            "autoencoder": flops_per_image(self.autoencoder, feats),
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.autoencoder.parameters(), lr=self.lr)

    # ---- features --------------------------------------------------------------------
    def raw_features(self, batch: dict[str, Any]) -> torch.Tensor:
        """FE(x): from the feature store when the batch carries them, else the backbone."""
        if "features" in batch:
            return batch["features"].float()
        self._input_hw = tuple(batch["image"].shape[-2:])
        return self.backbone(batch["image"])

    def features(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.standardised(self.raw_features(batch))

    def standardised(self, feats: torch.Tensor) -> torch.Tensor:
        """Features per channel in training units (`standardize`), else unchanged."""
        if not self.standardize:
            return feats
        mean, std = self.feature_mean.to(feats.device), self.feature_std.to(feats.device)
        return (feats - mean[:, None, None]) / std[:, None, None]

    def training_features(self, max_images: int) -> torch.Tensor:
        """Raw features of up to `max_images` training images (one rank's view, unshuffled).

        Called from `setup()`, where Lightning already reports the run's device as
        `self.device` (and `training_images` moves the batches there) but has not moved the
        parameters yet: the backbone goes to that device first, else CUDA images meet a CPU
        backbone when the feature store is off. The strategy moves the rest just after.
        """
        self.backbone.to(self.device)
        feats, n = [], 0
        for batch in training_images(self):
            feats.append(self.raw_features(batch).cpu())
            n += len(feats[-1])
            if n >= max_images:
                break
        return torch.cat(feats)[:max_images]

    def setup(self, stage: str) -> None:
        """Before training: the statistics of the training features the AE trains on, fitted
        on every fit (a module trained again may be trained on other images; a resumed fit's
        checkpoint restores its own just after)."""
        if stage != "fit":
            return
        fit_global = (  # the residual's Gaussian needs the trained AE: at test start
            self.global_weight > 0 and self.global_source == "features"
        )
        if not (self.standardize or fit_global):
            return
        feats = self.training_features(self.stats_images)  # once, for both
        if self.standardize:
            self.fit_feature_statistics(feats)
        if fit_global:
            self.fit_global_statistics(feats)

    def on_train_start(self) -> None:
        """After a checkpoint given to `fit` is restored (which `setup` precedes; strategies
        that restore after their own setup, FSDP and DeepSpeed, restore after `on_fit_start`)."""
        self.clear_scoring_statistics()

    def clear_scoring_statistics(self) -> None:
        """Forget what was fitted on the trained AE's residuals (a module fitted and tested
        before, loaded from a model file, or restored from a checkpoint saved after a test,
        is about to be trained again): the distances' scales and the whitening RMS, the global
        branch's validation statistics, and the residual's Gaussian; test start fits them for
        the new AE. The feature statistics and the features' Gaussian describe the AE's
        input: `setup` fits them."""
        self.scale_fitted = torch.tensor(False, device=self.scale_fitted.device)
        self.residual_std_fitted = torch.tensor(False, device=self.residual_std_fitted.device)
        cleared = GLOBAL_BUFFERS if self.global_source == "residual" else GLOBAL_VALIDATION
        for name in cleared:
            self._buffers[name] = self._unfitted[name].to(self._buffers[name].device)

    @torch.no_grad()
    def fit_feature_statistics(self, feats: torch.Tensor) -> None:
        """Per-channel mean and std over images and positions of the training features."""
        flat = feats.double().transpose(0, 1).flatten(1)
        std = flat.std(1, unbiased=False)
        self.feature_mean = flat.mean(1).float().to(self.feature_mean.device)
        self.feature_std = (
            torch.where(std > 1e-6, std, torch.ones_like(std)).float().to(self.feature_std.device)
        )
        self.stats_fitted = torch.tensor(True, device=self.stats_fitted.device)

    @torch.no_grad()
    def fit_global_statistics(self, feats: torch.Tensor) -> None:
        """The Gaussian of the training images' pooled descriptors (of the standardised
        features, so after `fit_feature_statistics`)."""
        descriptors = torch.cat(
            [
                global_descriptor(self.standardised(feats[i : i + GLOBAL_CHUNK]))
                for i in range(0, len(feats), GLOBAL_CHUNK)
            ]
        )
        self.set_global_gaussian(descriptors)

    @torch.no_grad()
    def fit_global_residual_statistics(self, loader: Iterable[dict[str, Any]]) -> None:
        """The Gaussian of the pooled residuals of the training images in `loader` (at test
        start: `global_images` of them, evenly spaced, null = all; every DDP rank reads the
        same ones, so fits the same), from the trained AE."""
        descriptors = []
        for batch in loader:
            feats = self.features(batch)
            descriptors.append(residual_descriptor(self.autoencoder(feats) - feats).cpu())
        self.set_global_gaussian(torch.cat(descriptors))

    def set_global_gaussian(self, descriptors: torch.Tensor) -> None:
        device = self.feature_mean.device
        mean, std, precision = fit_global_gaussian(descriptors)
        self.global_mean, self.global_std = mean.to(device), std.to(device)
        self.global_precision = precision.to(device)

    def global_score(self, feats: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] standardised features and their reconstruction -> [B] Mahalanobis
        distances of the pooled `global_source` to the training images'."""
        if self.global_mean.numel() == 0:
            raise RuntimeError(
                "model.global_weight > 0 but the global branch was not fitted: it is fitted "
                "on the training images, before training (global_source=features) or at test "
                "start (residual); a model trained without it lacks it"
            )
        if self.global_source == "residual":
            descriptor = residual_descriptor(reconstruction - feats)
        else:
            descriptor = global_descriptor(feats)
        if descriptor.shape[1] != self.global_mean.numel():
            raise RuntimeError(
                f"the global branch was fitted on {self.global_mean.numel()} pooled values per "
                f"image, but model.global_source={self.global_source} pools "
                f"{descriptor.shape[1]}: score with the global_source the model was fitted with"
            )
        return global_distance(descriptor, self.global_mean, self.global_std, self.global_precision)

    @torch.no_grad()
    def fit_global_scale(self, loader: Any) -> None:
        """On normal validation images: the mean and std of the global distance, and the std
        of each image score, that `score` z-scores the distance with and brings it back in."""
        distances, scores = [], {name: [] for name in self.score_names}
        for batch in loader:
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            feats, reconstruction, out = self.residual_scores(batch)
            distances.append(self.global_score(feats, reconstruction).double().cpu())
            for name in self.score_names:
                scores[name].append(out.image[name].double().cpu())
        g = torch.cat(distances)
        stds = torch.stack([torch.cat(s).std(unbiased=False) for s in scores.values()])
        g_val = torch.stack([g.mean(), g.std(unbiased=False).clamp_min(1e-8)])
        self.global_val = g_val.float().to(self.device)
        self.score_val_std = stds.clamp_min(1e-8).float().to(self.device)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        """The global branch's buffers take the stored shapes; a state dict without them, or
        without the late buffers (a file written before them), loads strictly with them
        unfitted: empty (branch off), the unit scales, no shift, the unit std not fitted."""
        names = (*GLOBAL_BUFFERS, *LATE_BUFFERS)
        for name in names:
            if prefix + name not in state_dict:
                self._buffers[name] = self._unfitted[name].to(self._buffers[name].device)
        filled = buffers_from_state(self, state_dict, prefix, names, keep_missing=True)
        super()._load_from_state_dict(filled, prefix, *args, **kwargs)

    @property
    def separate_pixel_scale(self) -> bool:
        """The heat map's combined parts are scaled otherwise than the image score's."""
        return (
            self.pixel_distance == "combined"
            and self.pixel_distance_norm is not None
            and self.pixel_distance_norm != self.distance_norm
        )

    @property
    def separate_pixel_map(self) -> bool:
        """The heat map is not the image score's map: another distance, scale or pooling."""
        return (
            self.pixel_distance != self.distance or self.separate_pixel_scale or self.pixel_pool > 1
        )

    @property
    def distances_used(self) -> set[str]:
        return {self.distance, self.pixel_distance}

    def residual_grid(
        self, reconstruction: torch.Tensor, feats: torch.Tensor, pixel: bool = False
    ) -> torch.Tensor:
        """The image score's distance on the feature grid, or with `pixel` the heat map's
        (`pixel_distance` of the `pixel_pool`-averaged residual, with its own scale and shift
        when `pixel_distance_norm` differs)."""
        own = pixel and self.separate_pixel_scale
        if pixel and self.pixel_pool > 1:  # pool(rec) - pool(feats) = pool(rec - feats)
            reconstruction, feats = self.pooled(reconstruction), self.pooled(feats)
        return residual_distance(
            reconstruction,
            feats,
            self.pixel_distance if pixel else self.distance,
            self.pixel_distance_scale if own else self.distance_scale,
            self.residual_std,
            self.pixel_distance_shift if own else self.distance_shift,
            self.distance_combine,
        )

    def pooled(self, grid: torch.Tensor) -> torch.Tensor:
        """The k x k neighbourhood mean of each position (k = `pixel_pool`, same grid size)."""
        k = self.pixel_pool
        return F.avg_pool2d(grid, k, 1, k // 2, count_include_pad=False)

    @torch.no_grad()
    def fit_distance_scale(self, loader: Any) -> None:
        """On normal images (the scored checkpoint), what the distances in use are divided by.

        `combined`: per part (l2, cosine), the scale of its maps: their mean
        (`distance_norm=mean`, no shift), or the spread q0.995 - q0.9 of the image-sized,
        smoothed maps that scores and thresholds are taken from, and q0.9 as the shift
        (`tail`, on a fixed random sample of pixels per map); the heat map's own too when
        `pixel_distance_norm` differs.
        `l2_whitened`: the root mean square of each channel of the residual over images and
        positions (not the std around its mean: a channel with a steady offset would add
        (offset / std)^2 to every position), floored at RESIDUAL_RMS_FLOOR x the median
        channel's; of the `pixel_pool`-averaged residual that the heat map whitens. One pass
        over the loader serves all."""
        norms = {self.distance_norm} if "combined" in self.distances_used else set()
        if self.separate_pixel_scale:
            norms.add(self.pixel_distance_norm)
        whiten = "l2_whitened" in self.distances_used
        sums, n = torch.zeros(2, dtype=torch.float64), 0
        squares, positions = torch.zeros(self.residual_std.numel(), dtype=torch.float64), 0
        samples: list[list[torch.Tensor]] = [[], []]
        generator = torch.Generator().manual_seed(0)
        for batch in loader:
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            feats = self.features(batch)
            rec = self.autoencoder(feats)
            size = tuple(batch["image"].shape[-2:])
            if whiten:
                residual = rec - feats if self.pixel_pool == 1 else self.pooled(rec - feats)
                squares += residual.pow(2).sum((0, 2, 3), dtype=torch.float64).cpu()
                positions += feats[:, 0].numel()
            for i, how in enumerate(("l2", "cosine") if norms else ()):
                grid = residual_distance(rec, feats, how)
                if "mean" in norms:
                    sums[i] += grid.double().mean((1, 2)).sum().cpu()
                if "tail" in norms:
                    flat = upsample_and_smooth(grid, size, self.sigma).flatten(1).cpu()
                    pick = torch.randperm(flat.shape[1], generator=generator)
                    samples[i].append(flat[:, pick[:TAIL_PIXELS_PER_MAP]].flatten())
            n += len(feats)
        scales, shifts = {}, {}
        if "mean" in norms:
            scales["mean"] = sums / max(n, 1)
            shifts["mean"] = torch.zeros(2, dtype=torch.float64)
        if "tail" in norms:
            levels = torch.tensor(TAIL_QUANTILES, dtype=torch.float64)
            quantiles = torch.stack(
                [torch.quantile(torch.cat(part).double(), levels) for part in samples]
            )
            scales["tail"], shifts["tail"] = quantiles[:, 1] - quantiles[:, 0], quantiles[:, 0]
        as_scale = {k: v.clamp_min(1e-8).float().to(self.device) for k, v in scales.items()}
        as_shift = {k: v.float().to(self.device) for k, v in shifts.items()}
        if norms:
            self.distance_scale = as_scale[self.distance_norm]
            self.distance_shift = as_shift[self.distance_norm]
        if self.separate_pixel_scale:
            self.pixel_distance_scale = as_scale[self.pixel_distance_norm]
            self.pixel_distance_shift = as_shift[self.pixel_distance_norm]
        if whiten:
            rms = (squares / max(positions, 1)).sqrt()
            floor = max(RESIDUAL_RMS_FLOOR * float(rms.median()), 1e-12)
            self.residual_std = rms.clamp_min(floor).float().to(self.device)
            self.residual_std_fitted = torch.tensor(True, device=self.device)
            self.residual_std_pool = torch.tensor(self.pixel_pool, device=self.device)
        self.scale_fitted = torch.tensor(True, device=self.device)

    @property
    def distance_fit_pending(self) -> bool:
        """A distance in use still lacks its statistics on normal images (never fitted, or the
        file was written before the statistic existed): `on_test_start` fits them.

        The tail shift (q0.9 of a positive distance, never 0 once fitted) is missing from files
        written before it; their `sum` does not need it (a constant), a `max` does. The
        residual's RMS is refitted when it was fitted at another `pixel_pool`."""
        used = self.distances_used
        shifted = [(self.distance_norm, self.distance_shift)] if "combined" in used else []
        if self.separate_pixel_scale:
            shifted.append((self.pixel_distance_norm, self.pixel_distance_shift))
        no_shift = self.distance_combine == "max" and any(
            norm == "tail" and not bool(shift.any()) for norm, shift in shifted
        )
        return (
            ("combined" in used and not bool(self.scale_fitted))
            or (
                "l2_whitened" in used
                and (
                    not bool(self.residual_std_fitted)
                    or int(self.residual_std_pool) != self.pixel_pool
                )
            )
            or no_shift
        )

    @property
    def global_fit_pending(self) -> bool:
        """The global branch is on but lacks its statistics on normal validation images (and,
        pooling the residual, its training Gaussian too: a new fit clears both)."""
        return self.global_weight > 0 and self.global_val.numel() == 0

    def unfitted_for_scoring(self) -> str | None:
        if self.distance_fit_pending:
            return (
                "the residual distances' statistics on normal validation images (distance "
                f"{self.distance}, heat map {self.pixel_distance} at model.pixel_pool="
                f"{self.pixel_pool}; its residual RMS fitted: {bool(self.residual_std_fitted)}, "
                f"at pool {int(self.residual_std_pool)})"
            )
        if self.global_fit_pending:
            return "the global branch's statistics on normal validation images" + (
                " (and its Gaussian of the training images' residuals)"
                if self.global_source == "residual" and self.global_mean.numel() == 0
                else ""
            )
        return None

    def on_test_start(self) -> None:
        fit_scale = self.distance_fit_pending
        fit_global = self.global_fit_pending
        if not (fit_scale or fit_global):
            return
        loader = normal_images(self)
        self.autoencoder.eval()
        with scoring_context(self):  # the scale the test residuals are divided by
            if fit_scale:
                self.fit_distance_scale(loader)
            if fit_global:  # after the scale: the map scores it is weighed against use it
                if self.global_source == "residual" and self.global_mean.numel() == 0:
                    images = training_images(self, limit=self.global_images)
                    self.fit_global_residual_statistics(images)
                self.fit_global_scale(loader)

    # ---- training ----------------------------------------------------------------------
    def reconstruction_loss(self, feats: torch.Tensor, corrupt: bool = False) -> torch.Tensor:
        """MSE of the AE's reconstruction against the clean features. With `corrupt` (training
        only), the AE's input loses a random `input_dropout` share of its values, so the AE
        cannot learn to copy what it is shown (Dinomaly's noisy bottleneck, arXiv 2405.14325)."""
        inputs = feats
        if corrupt and self.input_dropout > 0:
            inputs = F.dropout(feats, self.input_dropout, training=True)
        return F.mse_loss(self.autoencoder(inputs), feats)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.check_finite(self.reconstruction_loss(self.features(batch), corrupt=True))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    def validation_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.reconstruction_loss(self.features(batch))

    # ---- scoring -----------------------------------------------------------------------
    def residual_scores(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, Scores]:
        """The standardised features, their reconstruction, and the residual map with its
        image scores."""
        feats = self.features(batch)
        reconstruction = self.autoencoder(feats)
        size = tuple(batch["image"].shape[-2:])
        anomaly_map = upsample_and_smooth(
            self.residual_grid(reconstruction, feats), size, self.sigma
        )
        image = {f"residual_{how}": reduce_map(anomaly_map, how) for how in SCORE_REDUCTIONS}
        if self.separate_pixel_map:  # the heat map: its own distance or scale, same AE pass
            anomaly_map = upsample_and_smooth(
                self.residual_grid(reconstruction, feats, pixel=True), size, self.sigma
            )
        return feats, reconstruction, Scores(image=image, map=anomaly_map)

    def score(self, batch: dict[str, Any]) -> Scores:
        feats, reconstruction, scores = self.residual_scores(batch)
        if self.global_weight > 0:
            scores = self.with_global(self.global_score(feats, reconstruction), scores)
        return scores

    def with_global(self, g: torch.Tensor, scores: Scores) -> Scores:
        """Each image score s + w * std_val(s) * z(g), z(g) the global distance z-scored on
        normal validation images: ranks as z(s) + w z(g) does, and s keeps its units (and
        thresholds their meaning). The pure distance is reported as `global`."""
        if self.global_val.numel() == 0:
            raise RuntimeError(
                "model.global_weight > 0 but the global distance's validation statistics are "
                "not fitted: on_test_start fits them on the normal validation images"
            )
        z = (g - self.global_val[0]) / self.global_val[1]
        image = {
            name: scores.image[name] + self.global_weight * self.score_val_std[i] * z
            for i, name in enumerate(self.score_names)
        }
        return Scores(image=image | {"global": g}, map=scores.map)
