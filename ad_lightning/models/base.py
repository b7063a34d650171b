"""AnomalyModule: the one place where evaluation happens, for every method.

A method subclasses it and implements training (its paper's loss) and `score(batch)`,
returning named image scores and optionally an anomaly map. The base scores the normal
validation images (the thresholds a model ships with, normalisation) and the test set once,
gathers across DDP ranks, and computes the metrics; it knows nothing about any method.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from ad_lightning.backbones.features import FeatureExtractor
from ad_lightning.checks import choice
from ad_lightning.distributed import all_gather_objects
from ad_lightning.metrics.evaluator import evaluate_scores, flatten, pixel_auroc
from ad_lightning.metrics.thresholds import f1_optimal_threshold, false_alarm_threshold

log = logging.getLogger(__name__)
PROTOCOLS = ("leak_free", "paper")
THRESHOLD_RULES = ("false_alarm_rate", "f1_optimal")


@dataclass
class Scores:
    """Per-image scores by name (each a tensor [B]) and an optional anomaly map [B, H, W]."""

    image: dict[str, torch.Tensor]
    map: torch.Tensor | None = None


class DivergenceError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


@dataclass
class EvalConfig:
    protocol: str = "leak_free"
    false_alarm_rate: float = 0.01
    kept_map_size: int = 128
    threshold: str = "false_alarm_rate"


class AnomalyModule(pl.LightningModule):
    """Base of every method. Subclasses set `primary_score` and implement `score`."""

    #: the name in Scores.image that results.json reports as `image_auroc`
    primary_score: str = "score"
    #: False for methods whose fit only collects statistics (no optimiser step)
    trains_by_gradient: bool = True
    #: True when score() needs autograd (AnoGAN's latent search)
    score_needs_grad: bool = False
    #: why the scoring path cannot be an ONNX graph (None: it can)
    export_blocker: str | None = None
    #: True when training reads frozen-backbone features from a feature store (Skip-DFR, DFR)
    reads_stored_features: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.eval_config = EvalConfig()
        self.test_results: dict[str, Any] | None = None
        self._records: list[dict[str, Any]] = []
        self._val_scores: dict[str, torch.Tensor] = {}
        #: image and pixel decision thresholds, set from normal validation images before testing
        self.thresholds: dict[str, Any] | None = None
        self._has_masks = False
        self._maps: dict[str, torch.Tensor] = {}
        # Full-resolution map (float32) and mask (bool) per test image, keyed by path, for an
        # exact pixel AUROC at epoch end: 5 bytes a pixel, e.g. 200 images at 256 x 256 = 66 MB
        # per rank, all ranks' on each after the gather, plus float64 copies while computing
        # (BinaryAUROC without thresholds held every pixel too).
        self._pixels: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._inference_s = 0.0
        self._n_scored = 0

    # ---- what a method implements -------------------------------------------------
    def score(self, batch: dict[str, Any]) -> Scores:
        raise NotImplementedError

    def validation_loss(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """The training objective on normal validation images, for model selection; None if none."""
        return None

    @property
    def monitor(self) -> str | None:
        """Metric that selects the checkpoint to score (leak-free: validation data only)."""
        return "val/loss" if self.trains_by_gradient else None

    def describe(self) -> dict[str, Any]:
        """Method facts for results.json (backbone, weights used, ...)."""
        return {}

    def fitted_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The run's model config with what fit decided (DFR's PCA latent size), so that a
        model file rebuilds the fitted architecture."""
        return config

    # ---- configuration from the run ------------------------------------------------
    def configure_evaluation(
        self,
        protocol: str = "leak_free",
        false_alarm_rate: float = 0.01,
        kept_map_size: int = 128,
        threshold: str = "false_alarm_rate",
    ) -> None:
        if not 0 <= false_alarm_rate < 1:
            raise ValueError(f"eval.false_alarm_rate={false_alarm_rate} must be in [0, 1)")
        self.eval_config = EvalConfig(
            choice("protocol", protocol, PROTOCOLS),
            float(false_alarm_rate),
            int(kept_map_size),
            choice("eval.threshold", threshold, THRESHOLD_RULES),
        )

    # ---- checkpoints ----------------------------------------------------------------
    def frozen_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of frozen feature extractors (rebuilt from their config)."""
        return tuple(
            f"{name}." for name, m in self.named_children() if isinstance(m, FeatureExtractor)
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave frozen backbones out of checkpoints: they are rebuilt from the config and
        their weights source (340 MB saved per checkpoint for ResNeXt101)."""
        prefixes = self.frozen_prefixes()
        if prefixes:
            checkpoint["state_dict"] = {
                k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(prefixes)
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Fill the frozen backbones' entries from the model as built, so loading stays
        strict for everything a checkpoint must hold."""
        prefixes = self.frozen_prefixes()
        stored = checkpoint["state_dict"]
        for key, value in self.state_dict().items():
            if key.startswith(prefixes) and key not in stored:
                stored[key] = value

    # ---- training safety -----------------------------------------------------------
    def check_finite(self, loss: torch.Tensor, what: str = "loss") -> torch.Tensor:
        """Stop with a clear message on NaN/inf; the last good checkpoint stays on disk."""
        if not torch.isfinite(loss).all():
            raise DivergenceError(
                f"{type(self).__name__}: {what} became {loss.detach().cpu().tolist()} at epoch {self.current_epoch}, step {self.global_step}; training diverged. Lower the learning rate; the last good checkpoint (last.ckpt) is kept."
            )
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss = self.validation_loss(batch)
        if loss is not None:
            self.log(
                "val/loss",
                self.check_finite(loss, "validation loss"),
                prog_bar=True,
                batch_size=len(batch["label"]),
            )

    # ---- scoring -------------------------------------------------------------------
    def _score(self, batch: dict[str, Any]) -> Scores:
        with torch.set_grad_enabled(self.score_needs_grad):
            out = self.score(batch)
        return Scores(
            {k: v.detach().float().reshape(-1) for k, v in out.image.items()},
            None if out.map is None else out.map.detach().float(),
        )

    def _kept_size(self, maps: torch.Tensor) -> torch.Tensor:
        """Maps [B, H, W] at most `kept_map_size` on their longer side, aspect kept (for heat
        maps; metrics and thresholds use full-size maps)."""
        h, w = maps.shape[-2:]
        scale = self.eval_config.kept_map_size / max(h, w)
        if scale >= 1:
            return maps
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]

    #: map pixels per validation image the pixel threshold is computed from (a fixed random
    #: choice of positions: the quantile of a random sample estimates the full maps')
    threshold_pixels_per_map: int = 16384

    def _pixel_sample(self, maps: torch.Tensor) -> torch.Tensor:
        """Values of full-size maps [B, H, W] at up to `threshold_pixels_per_map` positions."""
        flat = maps.flatten(1)
        if flat.shape[1] > self.threshold_pixels_per_map:
            generator = torch.Generator().manual_seed(0)
            keep = torch.randperm(flat.shape[1], generator=generator)[
                : self.threshold_pixels_per_map
            ]
            flat = flat[:, keep.to(flat.device)]
        return flat.flatten().cpu()

    def score_loader(self, loader: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Scores of every image of a loader, and a sample of their full-size map values
        (None for methods without maps)."""
        collected: dict[str, list[torch.Tensor]] = {}
        pixels: list[torch.Tensor] = []
        for batch in loader:
            batch = self.trainer.strategy.batch_to_device(batch) if self._trainer else batch
            scores = self._score(batch)
            for name, values in scores.image.items():
                collected.setdefault(name, []).append(values.cpu())
            if scores.map is not None:
                pixels.append(self._pixel_sample(scores.map))
        return {k: torch.cat(v) for k, v in collected.items()}, (
            torch.cat(pixels) if pixels else None
        )

    def fit_thresholds(
        self,
        val_scores: dict[str, torch.Tensor],
        val_pixels: torch.Tensor | None,
        labelled: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, Any] | None:
        """The thresholds a model ships with, from normal validation images only: the image
        threshold at `eval.false_alarm_rate` of them (or, with `eval.threshold=f1_optimal`, the
        best F1 on `labelled` = (scores, labels) of `data.threshold_split`), and a pixel
        threshold at the same false-alarm rate of their map pixels."""
        rate = self.eval_config.false_alarm_rate
        normal = val_scores.get(self.primary_score)
        image: dict[str, Any] = {
            "score": self.primary_score,
            "rule": self.eval_config.threshold,
            "false_alarm_rate": rate,
        }
        if normal is not None and normal.numel():
            image["at_false_alarm_rate"] = false_alarm_threshold(normal, rate)
            image["n_normal_images"] = int(normal.numel())
            image["value"] = image["at_false_alarm_rate"]
        elif self.eval_config.threshold == "false_alarm_rate":
            log.warning("no normal validation images (data.val_split=0): no thresholds are stored")
            return None
        if labelled is not None:
            t, f1 = f1_optimal_threshold(*labelled)
            image |= {
                "f1_optimal": t,
                "f1_on_threshold_split": f1,
                "n_threshold_split": len(labelled[1]),
            }
        if self.eval_config.threshold == "f1_optimal":
            if labelled is None:
                raise ValueError(
                    "eval.threshold=f1_optimal needs labelled images: set data.threshold_split=<folder under the category in the test layout (good/ and defect folders)>"
                )
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

    def on_test_epoch_start(self) -> None:
        self._records, self._maps, self._pixels = [], {}, {}
        self._inference_s, self._n_scored = 0.0, 0
        datamodule = self.trainer.datamodule
        self._val_scores, val_pixels = (
            self.score_loader(datamodule.val_dataloader()) if datamodule.val_samples else ({}, None)
        )
        labelled = None
        if getattr(datamodule, "threshold_samples", None):
            scores, _ = self.score_loader(datamodule.threshold_dataloader())
            labels = torch.tensor([s.label for s in datamodule.threshold_samples])
            labelled = (scores[self.primary_score], labels)
        self.thresholds = self.fit_thresholds(self._val_scores, val_pixels, labelled)
        self._has_masks = bool(getattr(datamodule, "has_masks", False))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        scores = self._score(batch)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self._inference_s += time.perf_counter() - start
        self._n_scored += len(batch["label"])
        missing = [] if self.primary_score in scores.image else [self.primary_score]
        if missing:
            raise KeyError(
                f"{type(self).__name__}.score() returned {sorted(scores.image)} but the primary score is {self.primary_score!r}; set model.score to one of them"
            )
        labels = torch.as_tensor(batch["label"]).cpu()
        for i, path in enumerate(batch["path"]):
            record = {"path": path, "label": int(labels[i]), "defect_type": batch["defect_type"][i]}
            record.update({name: float(v[i]) for name, v in scores.image.items()})
            self._records.append(record)
        if scores.map is not None:
            maps = scores.map
            masks = batch["mask"]
            if maps.shape[-2:] != masks.shape[-2:]:
                maps = F.interpolate(
                    maps[:, None], size=masks.shape[-2:], mode="bilinear", align_corners=False
                )[:, 0]
            if self._has_masks:
                for i, path in enumerate(batch["path"]):
                    # a copy, not a view of the batch: a pickled view carries the whole batch
                    self._pixels[path] = (
                        maps[i].to("cpu", copy=True),
                        masks[i].long().bool().cpu(),
                    )
            small = self._kept_size(maps)
            for i, path in enumerate(batch["path"]):
                self._maps[path] = small[i].half().cpu()

    def _gather_records(self) -> list[dict[str, Any]]:
        records = [r for part in all_gather_objects(self._records) for r in part]
        unique = {r["path"]: r for r in records}  # DistributedSampler pads with duplicates
        return sorted(unique.values(), key=lambda r: r["path"])

    def _gather_pixels(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """All ranks' maps and masks, one piece per image path: DistributedSampler pads its last
        batches with images another rank also scores, whose pixels must count once."""
        unique: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for part in all_gather_objects(self._pixels):
            unique.update(part)
        if not unique:
            return None
        paths = sorted(unique)
        maps = torch.cat([unique[p][0].flatten() for p in paths])
        masks = torch.cat([unique[p][1].flatten() for p in paths])
        return maps, masks

    def on_test_epoch_end(self) -> None:
        records = self._gather_records()
        names = [k for k in records[0] if k not in ("path", "label", "defect_type")]
        labels = torch.tensor([r["label"] for r in records])
        scores = {n: torch.tensor([r[n] for r in records], dtype=torch.float64) for n in names}
        per_score = evaluate_scores(
            scores, labels, self._val_scores, self.eval_config.false_alarm_rate
        )
        # Min-max normalisation: from validation scores (leak-free) or the test set itself
        # (protocol=paper, as DPAE reports). AUROC does not change; the scale does.
        for n in names:
            ref = (
                scores[n]
                if self.eval_config.protocol == "paper" or n not in self._val_scores
                else self._val_scores[n].double()
            )
            lo, hi = float(ref.min()), float(ref.max())
            for r in records:
                r[f"{n}_normalized"] = (r[n] - lo) / (hi - lo) if hi > lo else 0.0
        primary = per_score[self.primary_score]
        # The defect-ratio threshold takes the ratio from the test labels: a headline number
        # only under protocol=paper (as DPAE reports it); leak-free runs keep it apart.
        test_label_metrics = {"f1_at_defect_ratio": primary["at_defect_ratio"]["f1"]}
        metrics: dict[str, Any] = {"image_auroc": primary["auroc"], "image_ap": primary["ap"]}
        if self.eval_config.protocol == "paper":
            metrics |= test_label_metrics
        if "at_false_alarm_rate" in primary:
            metrics["f1_at_false_alarm_rate"] = primary["at_false_alarm_rate"]["f1"]
        pixels = self._gather_pixels() if self._has_masks else None
        self._pixels = {}
        if pixels is not None:
            metrics["pixel_auroc"] = pixel_auroc(*pixels)
        self.test_results = {
            "primary_score": self.primary_score,
            "metrics": metrics,
            "test_label_metrics": test_label_metrics,
            "scores": per_score,
            "records": records,
            "maps": self._maps,
            "val_scores": {k: v.tolist() for k, v in self._val_scores.items()},
            "thresholds": self.thresholds,
            "inference_ms_per_image": 1000 * self._inference_s / max(self._n_scored, 1),
            "n_images_timed": self._n_scored,
        }
        flat = (
            flatten(metrics, "test")
            | flatten(test_label_metrics, "test/test_label")
            | flatten(
                {n: {"auroc": s["auroc"], "ap": s["ap"]} for n, s in per_score.items()},
                "test/score",
            )
        )
        self.log_dict(flat, sync_dist=False)


class SingleObjective(AnomalyModule):
    """A method trained on one objective of the image batch, `loss(images)`: the training step
    checks and logs it, and the same objective on normal validation images selects the
    checkpoint (the AE baselines, CPCAE)."""

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.check_finite(self.loss(batch["image"]))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    def validation_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.loss(batch["image"])
