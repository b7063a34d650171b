"""Shuffling that depends only on (seed, epoch), so a resumed fit sees the same batches.

A DataLoader shuffled by one seeded generator draws epoch k's order from the generator's
state after k epochs; a fit resumed from a checkpoint starts a fresh generator and replays
epoch 0's order instead. Lightning calls `set_epoch` on a loader's sampler at every epoch
start (also after a resume), so a sampler seeded with seed + epoch gives a resumed run
exactly the batches of an uninterrupted one.

Random augmentations follow the same rule: a keyed shuffle yields (index, epoch) pairs, and
the dataset draws each image's augmentation from a generator seeded with (seed, epoch,
index). Albumentations' own generator is copied into every DataLoader worker and DDP rank
and restarts on resume, so without it every worker and rank replayed the same draws and a
resumed fit replayed epoch 0's; keyed, the draws depend on neither.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, Sampler

Key = int | tuple[int, int]  # an index, or (index, epoch) for a keyed shuffle


def draw_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of image `index` in `epoch` of a run seeded `seed`."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1)[0])


class EpochShuffle(Sampler[Key]):
    """A random permutation per epoch, drawn from a generator seeded with seed + epoch;
    `keyed`: each index comes with its epoch, for datasets that augment (`draw_seed`)."""

    def __init__(self, data: Sized, seed: int = 0, keyed: bool = False) -> None:
        self.n = len(data)
        self.seed = int(seed)
        self.epoch = 0
        self.keyed = keyed

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Key]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        return iter([(i, self.epoch) for i in order] if self.keyed else order)


class NoSingletonBatches(BatchSampler):
    """Batches of `batch_size`, except that a last batch of one image joins the one before.

    BatchNorm refuses a training batch of one image (297 images in batches of 8 leave one),
    and dropping it would cost the methods that collect statistics of every training image
    (PatchCore's bank, PaDiM's Gaussians, kNN banks) an image. `drop_last` keeps its usual
    meaning; Lightning rebuilds this sampler around a DistributedSampler under DDP.
    """

    def __iter__(self) -> Iterator[list[int]]:
        batches = list(super().__iter__())
        if len(batches) > 1 and len(batches[-1]) == 1:
            batches[-2].extend(batches.pop())
        return iter(batches)

    def __len__(self) -> int:
        n = super().__len__()
        single = not self.drop_last and len(self.sampler) % self.batch_size == 1
        return n - 1 if n > 1 and single else n


class KeyedBatches(NoSingletonBatches):
    """NoSingletonBatches whose indices come with their sampler's epoch, for a dataset that
    augments. The key is made here, not by the shuffle: under DDP Lightning rebuilds a batch
    sampler around a DistributedSampler of its own (keeping the class, not our shuffle), whose
    epoch it sets as it sets ours."""

    def __iter__(self) -> Iterator[list[Key]]:  # type: ignore[override]
        epoch = int(getattr(self.sampler, "epoch", 0))
        return iter([[(i, epoch) for i in batch] for batch in super().__iter__()])


def training_batches(
    data: Sized, batch_size: int, seed: int, keyed: bool = False
) -> dict[str, Any]:
    """DataLoader arguments for a training split: shuffled per (seed, epoch), and, only when
    the split would end in a batch of one image, that image joined to the batch before.
    `keyed`: the indices come with their epoch (a dataset with random augmentations).
    (A plain sampler is kept otherwise: resuming a fit reproduces its batches exactly with
    it, which we measured; with a batch sampler Lightning's resume drifted slightly.)"""
    if len(data) > 1 and len(data) % batch_size == 1:
        batches = KeyedBatches if keyed else NoSingletonBatches
        return {"batch_sampler": batches(EpochShuffle(data, seed), batch_size, False)}
    return {"sampler": EpochShuffle(data, seed, keyed), "batch_size": batch_size}
