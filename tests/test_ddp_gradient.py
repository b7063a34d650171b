"""DDP for the gradient-trained families: BatchNorm sync that spares frozen backbones, and one
representative method per family (from the registry) trained end to end from run.py on 2 gloo
ranks: it finishes, learns, and both ranks end with the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

import ad_lightning.distributed as distributed
from ad_lightning.backbones import FeatureExtractor
from ad_lightning.distributed import TrainableSyncBatchNorm
from ad_lightning.models.registry import list_methods, method_info

ROOT = Path(__file__).resolve().parents[1]
GRADIENT_FAMILIES = ("feature_reconstruction", "autoencoder", "gan")


class _FrozenAndTrainable(nn.Module):
    """A frozen timm backbone (BatchNormAct2d inside) beside a trainable BatchNorm head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = FeatureExtractor("efficientnet_lite0", blocks=[1, 2], pretrained=False)
        self.head = nn.Sequential(nn.Conv2d(self.backbone.out_channels, 8, 1), nn.BatchNorm2d(8))


def test_sync_batchnorm_converts_only_trainable_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = _FrozenAndTrainable()
    x = torch.randn(2, 3, 64, 64)
    before = model.backbone(x)
    n_bn_act = sum(type(m).__name__ == "BatchNormAct2d" for m in model.backbone.modules())
    assert n_bn_act > 0  # what Lightning's own conversion would strip of its activation
    monkeypatch.setattr(distributed, "_runs_on_cpu", lambda model: False)  # as on a GPU
    plugin = TrainableSyncBatchNorm()
    model = plugin.apply(model)
    assert isinstance(model.head[1], nn.SyncBatchNorm)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.backbone.modules())
    assert sum(type(m).__name__ == "BatchNormAct2d" for m in model.backbone.modules()) == n_bn_act
    model.train()
    assert not model.backbone.training  # a frozen backbone stays in eval mode
    torch.testing.assert_close(model.backbone(x), before, rtol=0, atol=0)
    model = plugin.revert(model)
    assert type(model.head[1]) is nn.BatchNorm2d and model.head[1].training


def test_sync_batchnorm_is_off_on_cpu() -> None:
    """gloo has no SyncBatchNorm: a CPU run keeps every BatchNorm as it is (and logs it)."""
    model = _FrozenAndTrainable()
    TrainableSyncBatchNorm().apply(model)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


def test_ddp_trainer_config_uses_the_trainable_only_plugin(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["trainer=ddp", "trainer.accelerator=cpu"])
    trainer: pl.Trainer = instantiate(
        cfg.trainer, devices=2, logger=False, default_root_dir=str(tmp_path)
    )
    assert type(trainer.strategy._layer_sync) is TrainableSyncBatchNorm


# ---- end to end: run.py on 2 gloo ranks ---------------------------------------------------------
def representative(family: str) -> str:
    """The family's first method in the registry that is not a paper preset (whose name
    carries _paper / _original and whose budget is the paper's)."""
    return next(
        name
        for name in list_methods()
        if method_info(name).family == family
        and not name.endswith(("_paper", "_original"))
    )


class RankWeights(pl.Callback):
    """Saves each rank's trained parameters at the end of fit (rank<r>.pt in `folder`)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        weights = {k: p.detach().cpu() for k, p in pl_module.named_parameters()}
        torch.save(weights, self.folder / f"rank{trainer.global_rank}.pt")
