"""The statistics family: methods fitted by one pass that collects rows of the normal images.

PaDiM, PatchCore, the deep-feature kNN and the classic baselines share the pass
(`StatisticsModule`) and buffers whose shapes are only known once fitted (`ResizableBuffers`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ad_lightning.distributed import gather_rows
from ad_lightning.models.base import AnomalyModule


class ResizableBuffers(nn.Module):
    """Buffers sized at fit time: a loaded state dict sets their shapes before copying."""

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        for name, buf in list(self._buffers.items()):
            stored = state_dict.get(prefix + name)
            if buf is not None and stored is not None and stored.shape != buf.shape:
                self._buffers[name] = buf.new_empty(stored.shape)
        self._on_buffers_loaded()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _on_buffers_loaded(self) -> None:
        """Drop caches derived from the buffers."""


class StatisticsModule(AnomalyModule):
    """Family base: a method whose 'training' collects statistics of the normal images in one pass.

    training_step hands each batch to `collect`; at epoch end the collected rows of all
    DDP ranks are gathered, the duplicates DistributedSampler pads with are dropped (by
    dataset index), and `finalise` turns the rows into buffers. No optimiser, and the
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
        rows = gather_rows(self, torch.cat(self._collected))
        index = gather_rows(self, torch.cat(self._indices))
        self._collected, self._indices = [], []
        order = torch.argsort(index, stable=True)
        rows, index = rows[order], index[order]
        keep = torch.ones_like(index, dtype=torch.bool)
        keep[1:] = (index[1:] != index[:-1]) | (index[1:] < 0)
        self.finalise(rows[keep])
        self.trainer.should_stop = True
