"""Shuffling that depends only on (seed, epoch), so a resumed fit sees the same batches.

A DataLoader shuffled by one seeded generator draws epoch k's order from the generator's
state after k epochs; a fit resumed from a checkpoint starts a fresh generator and replays
epoch 0's order instead. Lightning calls `set_epoch` on a loader's sampler at every epoch
start (also after a resume), so a sampler seeded with seed + epoch gives a resumed run
exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import Sampler


class EpochShuffle(Sampler[int]):
    """A random permutation per epoch, drawn from a generator seeded with seed + epoch."""

    def __init__(self, data: Sized, seed: int = 0) -> None:
        self.n = len(data)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())
