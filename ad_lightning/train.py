"""One experiment: instantiate data, model, loggers and trainer from the config; fit; test once; write.

`run(cfg)` is what run.py calls under Hydra; tests call it through Hydra's compose API.
"""

from __future__ import annotations

import csv
import logging
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import timm
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger

import ad_lightning
from ad_lightning.backbones.feature_store import FeatureDataModule
from ad_lightning.models.base import AnomalyModule, DivergenceError
from ad_lightning.outputs.artifacts import TestArtifacts, write_json
from ad_lightning.outputs.timing import EpochTimer

log = logging.getLogger(__name__)


def run_dir(cfg: DictConfig) -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.output_dir)


def config_choices() -> dict[str, str]:
    """The config group chosen per group (model=ae_ssim, data=...), so reports can tell apart
    runs whose model classes coincide; empty outside Hydra (compose API)."""
    if not HydraConfig.initialized():
        return {}
    choices = HydraConfig.get().runtime.choices
    return {k: str(v) for k, v in choices.items() if not k.startswith("hydra/") and v is not None}


def versions() -> dict[str, str]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        ).stdout.strip()
    except Exception:  # noqa: BLE001 - not a git checkout
        commit = ""
    return {
        "ad_lightning": ad_lightning.__version__,
        "git_commit": commit or "unknown",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pytorch_lightning": pl.__version__,
        "timm": timm.__version__,
    }


def build_loggers(cfg: DictConfig, out: Path) -> list[Any]:
    if not cfg.get("logger"):
        return []
    loggers = []
    for name, conf in cfg.logger.items():
        conf = OmegaConf.to_container(conf, resolve=True)
        if "WandbLogger" in conf.get("_target_", "") and not conf.get("group"):
            # jobs of one multirun share a W&B group: the sweep folder
            conf["group"] = (
                Path(HydraConfig.get().sweep.dir).name
                if HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN"
                else None
            )
        loggers.append(hydra.utils.instantiate(conf, save_dir=str(out)))
        log.info("logger %s -> %s", name, out)
    return loggers


def build_callbacks(cfg: DictConfig, model: AnomalyModule, out: Path) -> list[pl.Callback]:
    callbacks: list[pl.Callback] = [
        ModelCheckpoint(
            dirpath=out / "checkpoints",
            monitor=model.monitor,
            mode="min",
            save_last=True,
            save_top_k=1 if model.monitor else 0,
            filename="best-{epoch}",
        ),
        TestArtifacts(str(out), n_heatmaps=cfg.eval.n_heatmaps),
        EpochTimer(),
    ]
    for conf in (cfg.get("callbacks") or {}).values():
        if conf is None:
            continue
        if "EarlyStopping" in conf.get("_target_", "") and not model.monitor:
            continue
        callbacks.append(hydra.utils.instantiate(conf))
    return callbacks


def write_contamination(datamodule: Any, out: Path) -> Path | None:
    if not getattr(datamodule, "contaminated", None):
        return None
    path = out / "contamination.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "defect_type"])
        writer.writerows((str(s.path), s.defect_type) for s in datamodule.contaminated)
    return path


def with_feature_store(datamodule: Any, model: AnomalyModule, cfg: DictConfig, out: Path) -> Any:
    """Serve training/validation features from a store (one backbone pass per image per fit)
    to methods that train on a frozen backbone, unless random augmentation makes them vary."""
    store = cfg.get("feature_store") or {}
    if not (getattr(model, "reads_stored_features", False) and store.get("enabled", True)):
        return datamodule
    if datamodule.has_random_augmentation:
        log.info("feature store off: random train augmentations change the features every epoch")
        return datamodule
    return FeatureDataModule(
        datamodule, model.backbone, store.get("memory_gb", 4.0), out / "features"
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and test one configuration; return what results.json holds."""
    out = run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    model: AnomalyModule = hydra.utils.instantiate(cfg.model)
    model.configure_evaluation(cfg.protocol, cfg.eval.threshold_percentile, cfg.eval.kept_map_size)
    loggers = build_loggers(cfg, out)
    callbacks = build_callbacks(cfg, model, out)
    fit_data = with_feature_store(datamodule, model, cfg, out)
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, logger=loggers or False, callbacks=callbacks, default_root_dir=str(out)
    )
    results: dict[str, Any] = {
        "status": "running",
        "run_dir": str(out),
        "model": type(model).__name__,
        "protocol": cfg.protocol,
        "choices": config_choices(),
        "data": datamodule.summary(),
        "versions": versions(),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "warnings": [],
    }
    backbone = model.describe().get("backbone")
    if backbone and not backbone["pretrained"]:
        results["warnings"].append(
            f"backbone {backbone['name']} has RANDOM weights (backbone.pretrained=false)"
        )
    if datamodule.summary()["mask_note"]:
        results["warnings"].append(datamodule.summary()["mask_note"])
    contamination_file = write_contamination(datamodule, out)
    if contamination_file:
        results["data"]["contamination"]["file"] = str(contamination_file)

    start = time.perf_counter()
    try:
        trainer.fit(model, datamodule=fit_data)
    except DivergenceError as err:
        results.update(
            status="diverged",
            error=str(err),
            last_checkpoint=str(out / "checkpoints" / "last.ckpt"),
        )
        write_json(out / "results.json", results)
        finish_loggers(loggers)
        raise
    fit_s = time.perf_counter() - start
    feature_pass_s = getattr(fit_data, "feature_pass_s", 0.0)
    for logger in loggers:  # the one-off feature pass, apart from the per-epoch time/epoch_s
        logger.log_metrics({"time/feature_pass_s": feature_pass_s, "time/fit_s": fit_s})
    checkpoint = callbacks[0]
    ckpt_path = None
    if model.trains_by_gradient:
        use_best = cfg.protocol == "leak_free" and checkpoint.best_model_path
        ckpt_path = checkpoint.best_model_path if use_best else checkpoint.last_model_path or None
    results["checkpoint"] = {
        "scored": ckpt_path or "in-memory model after fit",
        "selection": f"lowest {model.monitor} (normal validation images only)"
        if ckpt_path and ckpt_path == checkpoint.best_model_path
        else "last epoch",
        "best_score": float(checkpoint.best_model_score)
        if checkpoint.best_model_score is not None
        else None,
        "epochs": trainer.current_epoch,
    }
    start = time.perf_counter()
    trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
    test_s = time.perf_counter() - start
    test = model.test_results
    results.update(
        status="finished",
        method=model.describe(),
        primary_score=test["primary_score"],
        metrics=test["metrics"],
        scores=test["scores"],
        val_scores=test["val_scores"],
        timings={
            "fit_s": round(fit_s, 2),
            "feature_pass_s": round(feature_pass_s, 2),
            "epoch_s": callbacks[2].summary(),
            "test_s": round(test_s, 2),
            "inference_ms_per_image": round(test["inference_ms_per_image"], 3),
            "n_images_timed": test["n_images_timed"],
            "device": str(model.device),
        },
    )
    if trainer.is_global_zero:
        write_json(out / "results.json", results)
        log.info("results: %s", {k: round(v, 4) for k, v in results["metrics"].items()})
    finish_loggers(loggers)
    return results


def finish_loggers(loggers: list[Any]) -> None:
    """Close each W&B run, so the next job of a multirun (same process) starts its own."""
    for logger in loggers:
        logger.finalize("success")
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
