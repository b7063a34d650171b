"""A script that runs one Lightning fit + test on CPU (1 process, or 2 gloo ranks with
strategy="ddp") and saves what each rank saw, for tests/test_ddp_statistics.py.

Lightning's DDP launcher starts rank 1 by re-running this script, so the tests run it in a
subprocess (under pytest the launcher would re-run pytest instead).

    python tests/ddp_probe.py features OUT DEVICES SYNC_BN BACKBONE_YAML...
    python tests/ddp_probe.py store OUT DEVICES SYNTHETIC_ROOT
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ad_lightning.backbones.feature_store import FeatureDataModule  # noqa: E402
from ad_lightning.backbones.features import FeatureExtractor  # noqa: E402


def trainer(devices: int, sync_batchnorm: bool = False) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        sync_batchnorm=sync_batchnorm,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def backbone(yaml: Path) -> FeatureExtractor:
    """The configured backbone with its weights if this machine has them, else random
    (the same random weights in every process: seeded)."""
    cfg = OmegaConf.load(yaml)
    cfg.allow_download = False
    torch.manual_seed(0)
    try:
        return instantiate(cfg)
    except InstantiationException:
        cfg.pretrained = False
        torch.manual_seed(0)
        return instantiate(cfg)


class RandomImages(Dataset):
    """Seeded random 64 px images with their index."""

    def __init__(self, n: int = 6, size: int = 64) -> None:
        self.images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "index": index}


def batchnorm_report(extractor: FeatureExtractor) -> dict[str, int]:
    norms = [m for m in extractor.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    return {
        "batchnorms": len(norms),
        "sync": sum(isinstance(m, nn.SyncBatchNorm) for m in norms),
        "training": sum(m.training for m in extractor.modules()),
    }


class FeatureProbe(pl.LightningModule):
    """Frozen extractors and one trainable layer; records BatchNorm state while training and
    the features of every test image."""

    def __init__(self, extractors: dict[str, FeatureExtractor]) -> None:
        super().__init__()
        self.extractors = nn.ModuleDict(extractors)
        # a trainable BatchNorm: what sync_batchnorm is for, and DDP needs a trainable parameter
        self.head = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.seen: dict[str, Any] = {"train": {}, "features": {}}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.head.parameters(), lr=0.0)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.seen["train"] = {k: batchnorm_report(e) for k, e in self.extractors.items()}
        return self.head(batch["image"]).mean() * 0

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        for name, extractor in self.extractors.items():
            feats = extractor(batch["image"])
            for i, f in zip(batch["index"].tolist(), feats, strict=True):
                self.seen["features"].setdefault(name, {})[i] = f.clone()


def probe_features(out: Path, devices: int, sync_bn: bool, yamls: list[Path]) -> None:
    """Saves each rank's features and, on rank 0, the reference: the features of all images
    from untouched copies of the extractors, made before Lightning saw them, in this process."""
    model = FeatureProbe({y.stem: backbone(y) for y in yamls})
    untouched = copy.deepcopy(model.extractors)
    run = trainer(devices, sync_bn)
    run.fit(model, DataLoader(RandomImages(), batch_size=2))
    run.test(model, DataLoader(RandomImages(), batch_size=2), verbose=False)
    if run.global_rank == 0:
        images = RandomImages().images
        model.seen["reference"] = {
            name: dict(enumerate(extractor(images))) for name, extractor in untouched.items()
        }
    torch.save(model.seen, out / f"features.rank{run.global_rank}.pt")


class StoreProbe(pl.LightningModule):
    """Reads the stored features of its share; saves the rank's store and backbone count."""

    def __init__(self, extractor: FeatureExtractor) -> None:
        super().__init__()
        self.extractor = extractor
        self.anchor = nn.Parameter(torch.zeros(1))
        self.seen_images = [0]
        extractor.net.register_forward_hook(
            lambda m, inputs, o: self.seen_images.__setitem__(
                0, self.seen_images[0] + len(inputs[0])
            )
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([self.anchor], lr=0.0)

    def on_train_start(self) -> None:
        stores = self.trainer.datamodule.stores
        torch.save(
            {
                "train": torch.from_numpy(np.array(stores["train"].features)),
                "in_memory": stores["train"].in_memory,
                "backbone_images": self.seen_images[0],
            },
            self.trainer.datamodule.spill_dir / f"probe.rank{self.global_rank}.pt",
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self.anchor * batch["features"].float().mean()


def probe_store(out: Path, devices: int, synthetic_root: str) -> None:
    from ad_lightning.data import SyntheticDataModule

    images = SyntheticDataModule(
        root=synthetic_root, category="object", image_size=64, num_workers=0, batch_size=8
    )
    model = StoreProbe(FeatureExtractor("efficientnet_lite0", blocks=[1, 2, 3]))
    data = FeatureDataModule(images, model.extractor, memory_gb=0, spill_dir=out)
    trainer(devices).fit(model, datamodule=data)


if __name__ == "__main__":
    mode, out, devices = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    if mode == "features":
        probe_features(out, devices, sys.argv[4] == "true", [Path(p) for p in sys.argv[5:]])
    else:
        probe_store(out, devices, sys.argv[4])
