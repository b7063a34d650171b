"""Gathering across DDP ranks: the one place that knows how (identity on one process)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist


def all_gather_objects(local: Any) -> list[Any]:
    """Every rank's picklable `local` (records, maps by path), in rank order; `[local]` alone
    outside DDP."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
        return parts
    return [local]


def gather_rows(module: pl.LightningModule, rows: torch.Tensor) -> torch.Tensor:
    """Concatenate [n_r, ...] tensors of all DDP ranks (n_r may differ), through the
    strategy's collective (on the module's device); identity on one process."""
    trainer = module._trainer
    if trainer is None or trainer.world_size == 1:
        return rows
    counts = module.all_gather(torch.tensor(len(rows), device=rows.device)).reshape(-1)
    padded = rows.new_zeros(int(counts.max()), *rows.shape[1:])
    padded[: len(rows)] = rows
    parts = module.all_gather(padded)  # [world, n_max, ...]
    return torch.cat([part[: int(n)] for part, n in zip(parts, counts, strict=True)])
