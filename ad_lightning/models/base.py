"""AnomalyModule: the contract every method fulfils, and thin Lightning hooks for testing.

A method subclasses it and implements training (its paper's loss) and `score(batch)`,
returning named image scores and optionally an anomaly map. The test hooks hand the scoring to
an `Evaluation` (metrics/evaluation.py: thresholds from the normal validation images, test
records, gathering across DDP ranks, metrics, normalisation), whose output is
`model.test_results`; thresholds and normalisation are kept as buffers of `post_processor`,
so they travel in the state dict. The base knows nothing about any method.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ad_lightning.backbones.features import BackboneChanged, FeatureExtractor
from ad_lightning.metrics.evaluation import EvalConfig, Evaluation, log_values
from ad_lightning.metrics.postprocess import PostProcessor
from ad_lightning.precision import scoring_context
from ad_lightning.results import TestResults

log = logging.getLogger(__name__)

__all__ = ["AnomalyModule", "DivergenceError", "EvalConfig", "Scores", "SingleObjective"]


def plain(value: Any) -> Any:
    """Hydra's containers (DictConfig, ListConfig) at any depth as plain dicts and lists."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return value


@dataclass
class Scores:
    """Per-image scores by name (each a tensor [B]) and an optional anomaly map [B, H, W]."""

    image: dict[str, torch.Tensor]
    map: torch.Tensor | None = None


class DivergenceError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


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
    #: a pretrained `backbone` is fed the data's images as data.normalize gives them (checked
    #: against its weights' statistics); False where it sees something else (CPCAE: maps)
    backbone_reads_images: bool = True
    #: True when a training step leaves some trainable parameters out of a backward pass
    #: (the GAN family's alternating G / D steps): DDP must then look for unused parameters
    ddp_find_unused_parameters: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.eval_config = EvalConfig()
        #: thresholds and the primary score's normalisation, as buffers (set by testing)
        self.post_processor = PostProcessor()
        #: the current (or last) test scoring; None before testing
        self.evaluation: Evaluation | None = None
        self.test_results: TestResults | None = None

    def save_hyperparameters(
        self,
        *args: Any,
        ignore: Any = None,
        frame: Any = None,
        logger: bool = False,
    ) -> None:
        """Lightning's, except that the loggers are not given the hyperparameters: each logger
        gets the run's whole resolved config (W&B: `model.seed`, ...), and Lightning would add
        the method's as loose top-level keys, PaDiM's `seed` over the run's `seed`."""
        super().save_hyperparameters(
            *args, ignore=ignore, frame=frame or inspect.currentframe().f_back, logger=logger
        )

    @property
    def thresholds(self) -> dict[str, Any] | None:
        """Image and pixel decision thresholds, set from normal validation images before
        testing (the dict results.json and model.pt carry; `post_processor` holds its values)."""
        return self.post_processor.thresholds

    @thresholds.setter
    def thresholds(self, thresholds: dict[str, Any] | None) -> None:
        self.post_processor.set_thresholds(thresholds)

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

    def unfitted_for_scoring(self) -> str | None:
        """What this model still lacks that only the test loop fits on normal images (None:
        nothing). A model file is scored outside that loop, so loading one that lacks it must
        fail instead of scoring with defaults."""
        return None

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
        aupro_fpr_limit: float = 0.3,
    ) -> None:
        self.eval_config = EvalConfig.checked(
            protocol, false_alarm_rate, kept_map_size, threshold, aupro_fpr_limit
        )

    # ---- checkpoints ----------------------------------------------------------------
    def frozen_extractors(self) -> dict[str, FeatureExtractor]:
        """Frozen feature extractors by state-dict prefix (rebuilt from their config)."""
        return {
            f"{name}.": m for name, m in self.named_children() if isinstance(m, FeatureExtractor)
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave frozen backbones out of checkpoints: they are rebuilt from the config and
        their weights source (340 MB saved per checkpoint for ResNeXt101). Their digests
        stay, so that a rebuild with other weights is caught on load."""
        extractors = self.frozen_extractors()
        if extractors:
            checkpoint["state_dict"] = {
                k: v
                for k, v in checkpoint["state_dict"].items()
                if not k.startswith(tuple(extractors))
            }
            checkpoint["frozen_digests"] = {p: m.digest() for p, m in extractors.items()}
        # plain values (Hydra passes lists as ListConfig): a checkpoint loads weights-only
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = plain(checkpoint["hyper_parameters"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Fill the frozen backbones' entries from the model as built, so loading stays
        strict for everything a checkpoint must hold; refuse a backbone whose weights are not
        the ones the checkpoint was fitted on (its scores would be silently wrong)."""
        extractors = self.frozen_extractors()
        recorded = checkpoint.get("frozen_digests", {})
        if extractors and not recorded:
            log.warning(
                "this checkpoint predates backbone digests: its %s backbone is rebuilt from %s "
                "unchecked",
                type(self).__name__,
                ", ".join(m.weights_source for m in extractors.values()),
            )
        for prefix, extractor in extractors.items():
            fitted, built = recorded.get(prefix), extractor.digest()
            if fitted is not None and fitted != built:
                raise BackboneChanged(
                    f"{type(self).__name__}'s backbone {extractor.alias} ({prefix[:-1]}), rebuilt "
                    f"now from {extractor.weights_source}, has other weights (sha256 "
                    f"{built[:12]}) than the one this checkpoint was fitted on ({fitted[:12]}): "
                    "its scores would be silently wrong. "
                    + (
                        "Random weights are drawn from the seed: use the run's seed"
                        if extractor.weights_source == "random"
                        else "Give backbone.weights the file the run used (results.json: "
                        "method.backbone.weights) or the package version it had"
                    )
                    + ", or fit again"
                )
        stored = checkpoint["state_dict"]
        for key, value in self.state_dict().items():
            if key.startswith(tuple(extractors)) and key not in stored:
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
                sync_dist=True,  # under DDP the checkpoint is chosen on all ranks' images
            )

    # ---- scoring -------------------------------------------------------------------
    def score_batch(self, batch: dict[str, Any]) -> Scores:
        """The public way to score a batch, used by testing and every deployed scorer alike:
        `score` with autograd only where the method needs it (AnoGAN's latent search), and
        float32, detached outputs (image scores [B] by name, map [B, H, W] or None)."""
        with torch.set_grad_enabled(self.score_needs_grad):
            out = self.score(batch)
        return Scores(
            {k: v.detach().float().reshape(-1) for k, v in out.image.items()},
            None if out.map is None else out.map.detach().float(),
        )

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.trainer.strategy.batch_to_device(batch) if self._trainer else batch

    # ---- testing: thin hooks around an Evaluation ------------------------------------
    def new_evaluation(self) -> Evaluation:
        """An empty test scoring under this run's evaluation config."""
        return Evaluation(self.eval_config, self.primary_score, type(self).__name__)

    def on_test_epoch_start(self) -> None:
        self.evaluation = self.new_evaluation()
        with scoring_context(self):  # thresholds from scores computed as test_step's are
            self.thresholds = self.evaluation.fit_thresholds(
                self.trainer.datamodule, self.score_batch, self._to_device
            )

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        assert self.evaluation is not None, "on_test_epoch_start starts the evaluation"
        self.evaluation.step(batch, self.score_batch, self.device)

    def on_test_epoch_end(self) -> None:
        assert self.evaluation is not None, "on_test_epoch_start starts the evaluation"
        self.test_results = self.evaluation.finish()
        self.post_processor.set_normalisation(
            *self.evaluation.normalisation.get(self.primary_score, (None, None))
        )
        self.log_dict(log_values(self.test_results), sync_dist=False)


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
