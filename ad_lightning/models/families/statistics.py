"""The statistics family: methods fitted by one pass that collects rows of the normal images.

PaDiM, PatchCore, the deep-feature kNN and the classic baselines share the pass
(`StatisticsModule`) and buffers whose shapes are only known once fitted (`ResizableBuffers`).

Under DDP each rank collects the rows of its share; the rows go to rank 0 alone, which runs
the fit (PatchCore's coreset selection, PaDiM's covariances and their inverses, a kNN bank's
standardisation) once, and broadcasts the fitted buffers, so every rank holds the same bank
without N ranks repeating the same selection on N copies of all rows (`fit_on_rank_zero`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import nn

from ad_lightning.models.base import AnomalyModule
from ad_lightning.nn.buffers import buffers_from_state

log = logging.getLogger(__name__)


class ResizableBuffers(nn.Module):
    """Buffers sized at fit time: a loaded state dict sets their shapes before copying."""

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        buffers_from_state(self, state_dict, prefix)
        self._on_buffers_loaded()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _on_buffers_loaded(self) -> None:
        """Drop caches derived from the buffers."""


def _world(module: pl.LightningModule) -> tuple[int, int]:
    """(rank, world size); (0, 1) outside DDP."""
    trainer = module._trainer
    if trainer is None or trainer.world_size == 1 or not dist.is_initialized():
        return 0, 1
    return trainer.global_rank, trainer.world_size


def gather_rows_to_rank_zero(module: pl.LightningModule, rows: torch.Tensor) -> torch.Tensor | None:
    """All ranks' [n_r, ...] rows concatenated in rank order on rank 0, None on the others
    (a gather, not an all-gather: only the rank that fits holds all rows)."""
    rank, world = _world(module)
    if world == 1:
        return rows
    counts = module.all_gather(torch.tensor(len(rows), device=rows.device)).reshape(-1)
    padded = rows.new_zeros(int(counts.max()), *rows.shape[1:])
    padded[: len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
    dist.gather(padded, parts, dst=0)
    if rank != 0:
        return None
    return torch.cat([part[: int(n)] for part, n in zip(parts, counts, strict=True)])


def broadcast_fitted_state(module: pl.LightningModule, holder: nn.Module) -> None:
    """Copy `holder`'s buffers (a fitted bank, Gaussians...) from rank 0 to every rank; the
    receivers resize theirs (`ResizableBuffers`) and drop caches derived from the old ones.
    Parameters and the frozen backbone are the same on every rank already and stay out."""
    rank, world = _world(module)
    if world == 1:
        return
    state = None
    if rank == 0:
        params = {name for name, _ in holder.named_parameters()}
        state = {
            k: v.detach().cpu()
            for k, v in holder.state_dict().items()
            if k not in params and not k.startswith("backbone.")
        }
    state = module.trainer.strategy.broadcast(state, src=0)
    if rank != 0:
        holder.load_state_dict(state, strict=False)


def fit_on_rank_zero(
    module: pl.LightningModule,
    rows: torch.Tensor,
    fit: Callable[[torch.Tensor], None],
    holder: nn.Module,
) -> None:
    """Gather this rank's `rows` to rank 0, `fit(all rows)` there once, and broadcast
    `holder`'s fitted buffers to the other ranks. On one process: `fit(rows)`."""
    gathered = gather_rows_to_rank_zero(module, rows)
    if gathered is not None:
        fit(gathered)
    broadcast_fitted_state(module, holder)


def drop_padding_duplicates(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows sorted by dataset index with the repeats DistributedSampler pads with dropped
    (rows without an index, -1, are all kept)."""
    order = torch.argsort(index, stable=True)
    rows, index = rows[order], index[order]
    keep = torch.ones_like(index, dtype=torch.bool)
    keep[1:] = (index[1:] != index[:-1]) | (index[1:] < 0)
    return rows[keep]


class StatisticsModule(AnomalyModule):
    """Family base: a method whose 'training' collects statistics of the normal images in one pass.

    training_step hands each batch to `collect`; at epoch end the collected rows of all
    DDP ranks are gathered on rank 0, the duplicates DistributedSampler pads with are dropped
    (by dataset index), `finalise` turns the rows into buffers there, and those buffers are
    broadcast to the other ranks. No optimiser, and the
    fit stops after that one pass whatever trainer.max_epochs says (more passes would
    only collect the same statistics again).
    """

    family = "statistics"
    trains_by_gradient = False

    def __init__(self) -> None:
        super().__init__()
        self._collected: list[torch.Tensor] = []
        self._indices: list[torch.Tensor] = []
        # no loss: Lightning's automatic loop refuses a training_step returning None under DDP
        self.automatic_optimization = False
        # never used: DistributedDataParallel refuses to wrap a module without a trainable
        # parameter, and these methods must still run under trainer=ddp
        self.ddp_anchor = nn.Parameter(torch.zeros(1))

    def collect(self, batch: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def finalise(self, rows: torch.Tensor) -> None:
        raise NotImplementedError

    def configure_optimizers(self) -> None:
        return None

    def on_fit_start(self) -> None:
        """The statistics are of the training images as they are: a random augmentation
        (a flip, a crop) would put images that never occur into the bank or the Gaussians,
        and misalign a per-pixel model. Refused before the pass, naming the key."""
        if getattr(self.trainer.datamodule, "has_random_augmentation", False):
            raise ValueError(
                f"{type(self).__name__} fits its statistics in one pass over the training "
                "images as they are, but data.train_augmentations is set: remove it for this "
                "method (data.train_augmentations=[])"
            )

    def on_train_epoch_start(self) -> None:
        self._collected, self._indices = [], []  # the statistics are of one pass

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        with torch.no_grad():
            rows = self.collect(batch).detach()
        self._collected.append(rows)
        index = batch.get("index")
        self._indices.append(
            torch.as_tensor(index, device=rows.device)
            if index is not None
            else torch.full((len(rows),), -1, device=rows.device)
        )

    def on_train_epoch_end(self) -> None:
        rows = gather_rows_to_rank_zero(self, torch.cat(self._collected))
        index = gather_rows_to_rank_zero(self, torch.cat(self._indices))
        self._collected, self._indices = [], []
        if rows is not None:  # rank 0 (or one process) fits once
            rows = drop_padding_duplicates(rows, index)
            self.finalise(rows)
            rank, world = _world(self)
            log.info(
                "%s fitted on %d rows on rank %d of %d", type(self).__name__, len(rows), rank, world
            )
        broadcast_fitted_state(self, self)
        self.trainer.should_stop = True
