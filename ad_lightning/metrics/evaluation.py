"""Evaluation of one method on one test split, apart from the method.

The model's Lightning hooks hand each piece to an `Evaluation`: before the test epoch it scores
the normal validation images (and the labelled `data.threshold_split`) and fits the thresholds a
model ships with; per test batch it times the scoring and keeps the per-image records, the
full-size maps and masks (for an exact pixel AUROC and AUPRO) and small maps for heat maps; at the end it
gathers all ranks, computes the metrics and the normalisation, and returns `TestResults`.
It knows a method only as a function from a batch to its scores.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ad_lightning.checks import choice
from ad_lightning.distributed import all_gather_objects
from ad_lightning.metrics.aupro import aupro
from ad_lightning.metrics.evaluator import evaluate_scores, flatten, pixel_auroc
from ad_lightning.metrics.thresholds import f1_optimal_threshold, false_alarm_threshold
from ad_lightning.results import TestResults

log = logging.getLogger(__name__)
PROTOCOLS = ("leak_free", "paper")
THRESHOLD_RULES = ("false_alarm_rate", "f1_optimal")
#: map pixels per validation image the pixel threshold is computed from (a fixed random
#: choice of positions: the quantile of a random sample estimates the full maps')
THRESHOLD_PIXELS_PER_MAP = 16384
#: record keys that are not scores
RECORD_KEYS = ("path", "label", "defect_type")


class ScoresLike(Protocol):
    """What a method's scoring returns (models.base.Scores): image scores [B] by name, and
    an optional map [B, H, W]; already detached and float."""

    image: dict[str, torch.Tensor]
    map: torch.Tensor | None


ScoreFn = Callable[[dict[str, Any]], ScoresLike]
Batch = dict[str, Any]


@dataclass
class EvalConfig:
    protocol: str = "leak_free"
    false_alarm_rate: float = 0.01
    kept_map_size: int = 128
    threshold: str = "false_alarm_rate"
    #: pixel AUPRO integrates the PRO curve up to this false-positive rate (MVTec AD: 0.3)
    aupro_fpr_limit: float = 0.3

    @classmethod
    def checked(
        cls,
        protocol: str = "leak_free",
        false_alarm_rate: float = 0.01,
        kept_map_size: int = 128,
        threshold: str = "false_alarm_rate",
        aupro_fpr_limit: float = 0.3,
    ) -> EvalConfig:
        """The run's `protocol` and `eval.*` keys, each checked (a typo fails before fit)."""
        if not 0 <= false_alarm_rate < 1:
            raise ValueError(f"eval.false_alarm_rate={false_alarm_rate} must be in [0, 1)")
        if not 0 < aupro_fpr_limit <= 1:
            raise ValueError(f"eval.aupro_fpr_limit={aupro_fpr_limit} must be in (0, 1]")
        return cls(
            choice("protocol", protocol, PROTOCOLS),
            float(false_alarm_rate),
            int(kept_map_size),
            choice("eval.threshold", threshold, THRESHOLD_RULES),
            float(aupro_fpr_limit),
        )


def require_threshold_split(rule: str, datamodule: Any) -> None:
    """The `eval.threshold=f1_optimal` precondition, in one place: the rule needs labelled
    images that are not the test set (`data.threshold_split`). train.py checks it before fit,
    the evaluation before fitting thresholds."""
    if rule == "f1_optimal" and not getattr(datamodule, "threshold_samples", None):
        raise ValueError(
            "eval.threshold=f1_optimal needs labelled images that are not the test set: set data.threshold_split=<folder under the category laid out like test/ (good/ and one folder per defect)>"
        )


# ---- scoring a loader (validation and threshold splits) -----------------------------------
def pixel_sample(maps: torch.Tensor, n: int = THRESHOLD_PIXELS_PER_MAP) -> torch.Tensor:
    """Values of full-size maps [B, H, W] at up to `n` positions per map (the same positions
    for every map)."""
    flat = maps.flatten(1)
    if flat.shape[1] > n:
        generator = torch.Generator().manual_seed(0)
        keep = torch.randperm(flat.shape[1], generator=generator)[:n]
        flat = flat[:, keep.to(flat.device)]
    return flat.flatten().cpu()


def require_finite(scores: ScoresLike, paths: list[str], method: str) -> None:
    """A NaN or infinite image score or map value is an error naming the images: one such
    pixel rescales every other pixel of the pixel AUROC into a tie (+inf) or into NaN (-inf),
    and a NaN validation score makes a threshold that flags nothing."""
    parts = {f"score {name}": values.detach() for name, values in scores.image.items()}
    if scores.map is not None:
        parts["map"] = scores.map.detach().flatten(1)
    bad = torch.zeros(len(paths), dtype=torch.bool)
    which = []
    for part, values in parts.items():
        wrong = ~torch.isfinite(values).reshape(len(paths), -1).all(1).cpu()
        if wrong.any():
            which.append(part)
            bad |= wrong
    if which:
        named = [p for p, b in zip(paths, bad.tolist(), strict=True) if b]
        raise FloatingPointError(
            f"{method} scored NaN or infinite values ({', '.join(which)}) for {len(named)} of "
            f"{len(paths)} images of a batch (first: {named[0]}); the model diverged or its "
            "statistics are degenerate, so no metric or threshold is computed from them"
        )


def score_loader(
    loader: Any,
    score: ScoreFn,
    to_device: Callable[[Batch], Batch] | None = None,
    method: str = "model",
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Scores of every image of a loader, and a sample of their full-size map values
    (None for methods without maps)."""
    collected: dict[str, list[torch.Tensor]] = {}
    pixels: list[torch.Tensor] = []
    for batch in loader:
        batch = to_device(batch) if to_device is not None else batch
        scores = score(batch)
        require_finite(scores, list(batch["path"]), method)
        for name, values in scores.image.items():
            collected.setdefault(name, []).append(values.cpu())
        if scores.map is not None:
            pixels.append(pixel_sample(scores.map))
    return {k: torch.cat(v) for k, v in collected.items()}, (torch.cat(pixels) if pixels else None)


# ---- thresholds -------------------------------------------------------------------------
def fit_thresholds(
    config: EvalConfig,
    primary_score: str,
    val_scores: dict[str, torch.Tensor],
    val_pixels: torch.Tensor | None,
    labelled: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any] | None:
    """The thresholds a model ships with, from normal validation images only: the image
    threshold at `eval.false_alarm_rate` of them (or, with `eval.threshold=f1_optimal`, the
    best F1 on `labelled` = (scores, labels) of `data.threshold_split`, which the caller has
    checked with `require_threshold_split`), and a pixel threshold at the same false-alarm
    rate of their map pixels."""
    rate = config.false_alarm_rate
    normal = val_scores.get(primary_score)
    image: dict[str, Any] = {
        "score": primary_score,
        "rule": config.threshold,
        "false_alarm_rate": rate,
    }
    if normal is not None and normal.numel():
        image["at_false_alarm_rate"] = false_alarm_threshold(normal, rate)
        image["n_normal_images"] = int(normal.numel())
        image["value"] = image["at_false_alarm_rate"]
    elif config.threshold == "false_alarm_rate":
        log.warning("no normal validation images (data.val_split=0): no thresholds are stored")
        return None
    if labelled is not None:
        t, f1 = f1_optimal_threshold(*labelled)
        image |= {
            "f1_optimal": t,
            "f1_on_threshold_split": f1,
            "n_threshold_split": len(labelled[1]),
        }
    if config.threshold == "f1_optimal":
        image["value"] = image["f1_optimal"]
    pixel = None
    if val_pixels is not None and val_pixels.numel():
        pixel = {
            "value": false_alarm_threshold(val_pixels, rate),
            "normal_median": float(val_pixels.float().median()),  # heat-map colour scale
            "false_alarm_rate": rate,
            "n_normal_pixels": int(val_pixels.numel()),
        }
    return {"image": image, "pixel": pixel}


# ---- gathering across ranks ---------------------------------------------------------------
def gather_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All ranks' records, one per image path, sorted by path."""
    gathered = [r for part in all_gather_objects(records) for r in part]
    unique = {r["path"]: r for r in gathered}  # DistributedSampler pads with duplicates
    return sorted(unique.values(), key=lambda r: r["path"])


def gather_pixels(
    pixels: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """All ranks' full-size maps and masks, one of each per image path (sorted by path), kept
    per image (AUPRO finds regions within each mask): DistributedSampler pads its last
    batches with images another rank also scores, whose pixels must count once."""
    unique: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for part in all_gather_objects(pixels):
        unique.update(part)
    if not unique:
        return None
    paths = sorted(unique)
    return [unique[p][0] for p in paths], [unique[p][1] for p in paths]


#: why a test split with masks has no pixel metrics (results.json's warnings)
BLANK_MASKS = (
    "every test mask is blank (no defect pixel in ground_truth/): pixel AUROC and AUPRO are "
    "undefined and not reported; check that the masks mark defects with non-zero pixels"
)


def pixel_metrics(
    maps: list[torch.Tensor], masks: list[torch.Tensor], fpr_limit: float
) -> dict[str, float]:
    """Pixel AUROC over every pixel at once, and AUPRO up to `fpr_limit` (when the masks hold
    both a defect region and a normal pixel, without which its curve is undefined). Empty when
    no mask marks a defect pixel: torchmetrics would report 0.0 for a curve without positives."""
    flat_maps = torch.cat([m.flatten() for m in maps])
    flat_masks = torch.cat([k.flatten() for k in masks])
    if not flat_masks.any():
        return {}
    metrics = {"pixel_auroc": pixel_auroc(flat_maps, flat_masks)}
    if flat_masks.any() and not flat_masks.all():
        metrics["pixel_aupro"] = aupro(maps, masks, fpr_limit)
    return metrics


def gather_maps(maps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """All ranks' kept (small, fp16) maps by path: heat maps are drawn, and their colour range
    taken, over every test image, not rank 0's share only."""
    return {path: m for part in all_gather_objects(maps) for path, m in part.items()}


# ---- maps ---------------------------------------------------------------------------------
def kept_size(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Maps [B, H, W] at most `size` on their longer side, aspect kept (for heat maps;
    metrics and thresholds use full-size maps)."""
    h, w = maps.shape[-2:]
    scale = size / max(h, w)
    if scale >= 1:
        return maps
    out = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(maps[:, None], size=out, mode="bilinear", align_corners=False)[:, 0]


def log_values(results: TestResults) -> dict[str, float]:
    """The finite numbers of a test scoring under logger keys (test/..., test/score/...)."""
    return (
        flatten(results.metrics, "test")
        | flatten(results.test_label_metrics, "test/test_label")
        | flatten(
            {n: {"auroc": s["auroc"], "ap": s["ap"]} for n, s in results.scores.items()},
            "test/score",
        )
    )


class Evaluation:
    """One scoring of a test split: thresholds first, then test batches, then the results."""

    def __init__(self, config: EvalConfig, primary_score: str, method: str = "model") -> None:
        self.config = config
        self.primary_score = primary_score
        self.method = method  # the class name, for error messages
        self.records: list[dict[str, Any]] = []
        self.val_scores: dict[str, torch.Tensor] = {}
        #: image and pixel decision thresholds, set from normal validation images before testing
        self.thresholds: dict[str, Any] | None = None
        self.has_masks = False
        self.maps: dict[str, torch.Tensor] = {}
        # Full-resolution map (float32) and mask (bool) per test image, keyed by path, for an
        # exact pixel AUROC at the end: 5 bytes a pixel, e.g. 200 images at 256 x 256 = 66 MB
        # per rank, all ranks' on each after the gather, plus float64 copies while computing
        # (BinaryAUROC without thresholds held every pixel too).
        self.pixels: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.inference_s = 0.0
        self.n_scored = 0
        #: (min, max) per score name that `<score>_normalized` was computed with
        self.normalisation: dict[str, tuple[float, float]] = {}

    def fit_thresholds(
        self, datamodule: Any, score: ScoreFn, to_device: Callable[[Batch], Batch] | None = None
    ) -> dict[str, Any] | None:
        """Score the datamodule's validation (and threshold) images and fit the thresholds."""
        require_threshold_split(self.config.threshold, datamodule)
        self.val_scores, val_pixels = (
            score_loader(datamodule.val_dataloader(), score, to_device, self.method)
            if datamodule.val_samples
            else ({}, None)
        )
        labelled = None
        if getattr(datamodule, "threshold_samples", None):
            loader = datamodule.threshold_dataloader()
            scores, _ = score_loader(loader, score, to_device, self.method)
            labels = torch.tensor([s.label for s in datamodule.threshold_samples])
            labelled = (scores[self.primary_score], labels)
        self.thresholds = fit_thresholds(
            self.config, self.primary_score, self.val_scores, val_pixels, labelled
        )
        self.has_masks = bool(getattr(datamodule, "has_masks", False))
        return self.thresholds

    def step(self, batch: Batch, score: ScoreFn, device: torch.device) -> None:
        """Score one test batch (timed) and keep its records and maps."""
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        scores = score(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        self.inference_s += time.perf_counter() - start
        self.n_scored += len(batch["label"])
        missing = [] if self.primary_score in scores.image else [self.primary_score]
        if missing:
            raise KeyError(
                f"{self.method}.score() returned {sorted(scores.image)} but the primary score is {self.primary_score!r}; set model.score to one of them"
            )
        require_finite(scores, list(batch["path"]), self.method)
        labels = torch.as_tensor(batch["label"]).cpu()
        for i, path in enumerate(batch["path"]):
            record = {"path": path, "label": int(labels[i]), "defect_type": batch["defect_type"][i]}
            record.update({name: float(v[i]) for name, v in scores.image.items()})
            self.records.append(record)
        if scores.map is not None:
            maps = scores.map
            masks = batch["mask"]
            if maps.shape[-2:] != masks.shape[-2:]:
                maps = F.interpolate(
                    maps[:, None], size=masks.shape[-2:], mode="bilinear", align_corners=False
                )[:, 0]
            if self.has_masks:
                for i, path in enumerate(batch["path"]):
                    # a copy, not a view of the batch: a pickled view carries the whole batch
                    self.pixels[path] = (
                        maps[i].to("cpu", copy=True),
                        masks[i].long().bool().cpu(),
                    )
            small = kept_size(maps, self.config.kept_map_size)
            for i, path in enumerate(batch["path"]):
                self.maps[path] = small[i].half().cpu()

    def finish(self) -> TestResults:
        """Gather every rank, compute metrics and normalisation: the test results."""
        records = gather_records(self.records)
        names = [k for k in records[0] if k not in RECORD_KEYS]
        labels = torch.tensor([r["label"] for r in records])
        scores = {n: torch.tensor([r[n] for r in records], dtype=torch.float64) for n in names}
        per_score = evaluate_scores(scores, labels, self.val_scores, self.config.false_alarm_rate)
        # Min-max normalisation: from validation scores (leak-free) or the test set itself
        # (protocol=paper, as DPAE reports). AUROC does not change; the scale does. Leak-free
        # without validation images (data.val_split=0) has none: it never reads the test set.
        for n in names:
            if self.config.protocol == "paper":
                ref = scores[n]
            elif n in self.val_scores:
                ref = self.val_scores[n].double()
            else:
                continue
            lo, hi = float(ref.min()), float(ref.max())
            self.normalisation[n] = (lo, hi)
            for r in records:
                r[f"{n}_normalized"] = (r[n] - lo) / (hi - lo) if hi > lo else 0.0
        primary = per_score[self.primary_score]
        # The defect-ratio threshold takes the ratio from the test labels: a headline number
        # only under protocol=paper (as DPAE reports it); leak-free runs keep it apart.
        test_label_metrics = {"f1_at_defect_ratio": primary["at_defect_ratio"]["f1"]}
        metrics: dict[str, Any] = {"image_auroc": primary["auroc"], "image_ap": primary["ap"]}
        if self.config.protocol == "paper":
            metrics |= test_label_metrics
        if "at_false_alarm_rate" in primary:
            metrics["f1_at_false_alarm_rate"] = primary["at_false_alarm_rate"]["f1"]
        pixels = gather_pixels(self.pixels) if self.has_masks else None
        self.pixels = {}
        warnings = []
        if pixels is not None:
            found = pixel_metrics(*pixels, self.config.aupro_fpr_limit)
            if not found:
                log.warning(BLANK_MASKS)
                warnings.append(BLANK_MASKS)
            metrics |= found
        return TestResults(
            primary_score=self.primary_score,
            metrics=metrics,
            test_label_metrics=test_label_metrics,
            scores=per_score,
            records=records,
            maps=gather_maps(self.maps),
            val_scores={k: v.tolist() for k, v in self.val_scores.items()},
            thresholds=self.thresholds,
            inference_ms_per_image=1000 * self.inference_s / max(self.n_scored, 1),
            n_images_timed=self.n_scored,
            warnings=warnings,
        )
