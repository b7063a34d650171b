"""The training images in evaluation form, for fits that read them after or before training;
and the normal images that test-time statistics are fitted on.

Skip-DFR and DFR fit feature statistics (and DFR its PCA size) on them before training; CPCAE
fits its kNN bank on them after training. Both want the split without augmentation or
shuffling, batches on the module's device.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Subset


def evenly_spaced(n: int, limit: int | None) -> list[int]:
    """`limit` indices spread evenly over range(n) (all of them when limit is None or >= n):
    a split in path order groups its images (by exposure, by line, by day), and its first
    `limit` would leave whole groups out."""
    if limit is None or limit >= n:
        return list(range(n))
    return [(i * n) // limit for i in range(limit)]


def training_images(
    module: pl.LightningModule, shard: bool = False, limit: int | None = None
) -> Iterator[dict[str, Any]]:
    """Batches of the training split in evaluation form, tensors on `module.device`.

    shard=False: every DDP rank reads the same images, so statistics fitted on them are the
    same on every rank. shard=True: this rank's share (every world_size-th image), for rows
    that are gathered across ranks afterwards. `limit`: that many images, evenly spaced over
    the split; with `shard`, the ranks share those.
    """
    loader = module.trainer.datamodule.train_eval_dataloader()
    world = module.trainer.world_size if shard else 1
    if limit is not None or world > 1:
        rank = module.trainer.global_rank if world > 1 else 0
        indices = evenly_spaced(len(loader.dataset), limit)[rank::world]
        share = Subset(loader.dataset, indices)
        loader = DataLoader(share, batch_size=loader.batch_size, num_workers=loader.num_workers)
    for batch in loader:
        yield {k: v.to(module.device) if torch.is_tensor(v) else v for k, v in batch.items()}


def normal_images(module: pl.LightningModule) -> DataLoader:
    """The normal images that a trained model's scoring statistics are fitted on at test start:
    the validation split, or the training split (in-sample) when there is none."""
    datamodule = module.trainer.datamodule
    if datamodule.val_samples:
        return datamodule.val_dataloader()
    return datamodule.train_eval_dataloader()
