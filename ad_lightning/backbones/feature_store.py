"""Frozen features computed once per image per fit, for methods that train on a frozen backbone.

A frozen backbone gives the same features for an image in every epoch (when training uses no
random augmentation), so re-running it each epoch only burns time: on a CPU the backbone pass
costs more than the autoencoder's training step. `FeatureStore` runs the extractor once over a
split and keeps the features in fp16, in memory up to a budget and beyond it in a memory-mapped
file in the run folder. `FeatureDataModule` wraps any image DataModule so that its training and
validation batches carry `features` instead of `image` during fit; the test split (and the
validation split scored after fit) stays images, since scoring measures the path from pixels.

Under DDP the backbone pass is sharded: rank r computes the features of images r, r + W, ...
(W ranks), and each batch of features is all-gathered, so the pass costs 1/W of the time per
rank. Every rank then holds all rows, because DistributedSampler deals each rank a different
share of the shuffled training images every epoch. A spilled store is one file per rank
(`train.rank1.npy`), so no rank opens, truncates or writes another rank's file.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ad_lightning.backbones.features import FeatureExtractor
from ad_lightning.data.sampling import training_batches
from ad_lightning.distributed import all_gather_objects

log = logging.getLogger(__name__)


class FeatureStore:
    """Features [N, C, h, w] of one split in fp16, row i = dataset index i."""

    def __init__(self, features: torch.Tensor | np.memmap) -> None:
        self.features = features

    @property
    def in_memory(self) -> bool:
        return isinstance(self.features, torch.Tensor)

    @property
    def nbytes(self) -> int:
        return int(self.features.nbytes)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> torch.Tensor:
        row = self.features[index]
        return row if isinstance(row, torch.Tensor) else torch.from_numpy(np.array(row))

    @classmethod
    def allocate(
        cls, n: int, row_shape: tuple[int, ...], memory_bytes: int, spill_path: Path
    ) -> FeatureStore:
        """Empty fp16 rows: in memory within the budget, else a memory-mapped file of its own."""
        shape = (n, *row_shape)
        nbytes = int(np.prod(shape)) * 2
        if nbytes <= memory_bytes:
            return cls(torch.empty(shape, dtype=torch.float16))
        spill_path.parent.mkdir(parents=True, exist_ok=True)
        log.info(
            "feature store: %.2f GB > budget %.2f GB, memory-mapped at %s",
            nbytes / 2**30,
            memory_bytes / 2**30,
            spill_path,
        )
        return cls(np.lib.format.open_memmap(spill_path, mode="w+", dtype=np.float16, shape=shape))

    def write(self, index: torch.Tensor, feats: torch.Tensor) -> None:
        if isinstance(self.features, torch.Tensor):
            self.features[index] = feats
        else:
            self.features[index.numpy()] = feats.numpy()

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        extractor: FeatureExtractor,
        loader: DataLoader,
        memory_bytes: int,
        spill_path: Path,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> FeatureStore:
        """One backbone pass over `loader`'s dataset, rows by dataset index.

        With world_size > 1 this rank runs the backbone on its share (every world_size-th
        image from `rank`) and receives the other shares' features batch by batch, so all
        ranks must call it together; `spill_path` must then be this rank's own file."""
        dataset = loader.dataset
        n = len(dataset)
        if world_size > 1:
            share = Subset(dataset, list(range(rank, n, world_size)))
            loader = DataLoader(share, batch_size=loader.batch_size, num_workers=loader.num_workers)
        # every rank takes part in every exchange, also after its own share ran out
        steps = max(all_gather_objects(len(loader))) if world_size > 1 else len(loader)
        batches = iter(loader)
        store: FeatureStore | None = None
        for _ in range(steps):
            batch = next(batches, None)
            mine = None
            if batch is not None:
                feats = extractor(batch["image"].to(device)).half().cpu()
                mine = (torch.as_tensor(batch["index"]).long(), feats)
            parts = all_gather_objects(mine) if world_size > 1 else [mine]
            for part in parts:
                if part is None:
                    continue
                index, feats = part
                if store is None:
                    store = cls.allocate(n, tuple(feats.shape[1:]), memory_bytes, spill_path)
                store.write(index, feats)
        if store is None:
            raise ValueError("feature store: the split is empty")
        if isinstance(store.features, np.memmap):
            store.features.flush()
        return store


class StoredFeatures(Dataset):
    """Items of a split with the stored features in place of the image."""

    def __init__(self, store: FeatureStore, samples: list[Any]) -> None:
        if len(store) != len(samples):
            raise ValueError(f"feature store holds {len(store)} rows for {len(samples)} images")
        self.store = store
        self.samples = samples

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "features": self.store[index],
            "label": self.samples[index].label,
            "path": str(self.samples[index].path),
            "index": index,
        }


class FeatureDataModule(pl.LightningDataModule):
    """An image DataModule whose train and val splits are served from feature stores.

    Everything else (test split, summary, masks, samples) is the wrapped module's, so the
    run, the evaluation and the reports see the same data. Built through `serve_features`,
    which leaves the store out where the features would vary between epochs.
    """

    def __init__(
        self,
        images: pl.LightningDataModule,
        extractor: FeatureExtractor,
        memory_gb: float = 4.0,
        spill_dir: str | Path = "features",
    ) -> None:
        super().__init__()
        self.images = images
        self.extractor = extractor
        self.memory_bytes = int(memory_gb * 2**30)
        self.spill_dir = Path(spill_dir)
        self.stores: dict[str, FeatureStore] = {}
        self.feature_pass_s = 0.0

    def __getattr__(self, name: str) -> Any:
        # summary(), has_masks, val_samples, test_samples, ... come from the image module
        if name in ("images", "_trainer") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.images, name)

    def _device(self) -> torch.device:
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _rank(self) -> tuple[int, int]:
        """(global rank, world size) of this process; (0, 1) outside DDP."""
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def spill_path(self, split: str) -> Path:
        """One file per split and rank: ranks never share (and so never truncate) a file."""
        rank, world = self._rank()
        return self.spill_dir / (f"{split}.npy" if world == 1 else f"{split}.rank{rank}.npy")

    def prepare_data(self) -> None:
        self.images.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.images.setup(stage)
        if stage not in (None, "fit") or self.stores:
            return
        device = self._device()
        self.extractor.to(device)
        start = time.perf_counter()
        budget = self.memory_bytes
        for split, loader in (
            ("train", self.images.train_eval_dataloader()),
            ("val", self.images.val_dataloader() if self.images.val_samples else None),
        ):
            if loader is None:
                continue
            store = FeatureStore.build(
                self.extractor, loader, budget, self.spill_path(split), device, *self._rank()
            )
            budget = max(0, budget - store.nbytes) if store.in_memory else budget
            self.stores[split] = store
        self.feature_pass_s = time.perf_counter() - start
        log.info(
            "feature store: %s in %.1f s (one backbone pass per image)",
            ", ".join(
                f"{k} {tuple(v.features.shape)} {'memory' if v.in_memory else 'memmap'}"
                for k, v in self.stores.items()
            ),
            self.feature_pass_s,
        )

    def teardown(self, stage: str | None = None) -> None:
        if stage == "fit":
            self.stores = {}

    def _loader(self, split: str, train: bool) -> DataLoader:
        samples = self.images.train_samples if split == "train" else self.images.val_samples
        batch_size = self.images.batch_size if train else self.images.eval_batch_size
        dataset = StoredFeatures(self.stores[split], samples)
        if not train:
            return DataLoader(dataset, batch_size=batch_size)
        return DataLoader(dataset, **training_batches(dataset, batch_size, self.images.seed))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        # after fit (teardown) the validation split is scored from images, like the test split
        if "val" not in self.stores:
            return self.images.val_dataloader()
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self.images.test_dataloader()

    def train_eval_dataloader(self) -> DataLoader:
        """The training split unshuffled: stored features during fit, images after it."""
        if "train" not in self.stores:
            return self.images.train_eval_dataloader()
        return self._loader("train", train=False)


def serve_features(
    images: Any,
    extractor: FeatureExtractor,
    enabled: bool = True,
    memory_gb: float = 4.0,
    spill_dir: str | Path = "features",
) -> Any:
    """`images` with training/validation features served from a store, or `images` as it is
    when the store is off or random train augmentation would make stored features wrong.
    The one place that decides it."""
    if not enabled:
        return images
    if getattr(images, "has_random_augmentation", False):
        log.info("feature store off: random train augmentations change the features every epoch")
        return images
    return FeatureDataModule(images, extractor, memory_gb, spill_dir)
