"""The training images in evaluation form, for fits that read them after or before training.

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


def training_images(module: pl.LightningModule, shard: bool = False) -> Iterator[dict[str, Any]]:
    """Batches of the training split in evaluation form, tensors on `module.device`.

    shard=False: every DDP rank reads the same images, so statistics fitted on them are the
    same on every rank. shard=True: this rank's share (every world_size-th image), for rows
    that are gathered across ranks afterwards.
    """
    loader = module.trainer.datamodule.train_eval_dataloader()
    world = module.trainer.world_size if shard else 1
    if world > 1:
        rank = module.trainer.global_rank
        share = Subset(loader.dataset, list(range(rank, len(loader.dataset), world)))
        loader = DataLoader(share, batch_size=loader.batch_size, num_workers=loader.num_workers)
    for batch in loader:
        yield {k: v.to(module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
