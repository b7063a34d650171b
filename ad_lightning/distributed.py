"""DDP helpers: gathering across ranks (identity on one process), and the BatchNorm
synchronisation that leaves frozen backbones alone."""

from __future__ import annotations

import logging
from typing import Any

import torch.distributed as dist
from pytorch_lightning.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn
from typing_extensions import override

log = logging.getLogger(__name__)


def all_gather_objects(local: Any) -> list[Any]:
    """Every rank's picklable `local` (records, maps by path), in rank order; `[local]` alone
    outside DDP."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
        return parts
    return [local]


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Rank `src`'s parameters and buffers on every rank (a re-initialised layer that must stay
    one model under DDP); nothing on one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src)


#: the BatchNorm classes synchronised exactly; subclasses (timm's BatchNormAct2d) carry more
#: than SyncBatchNorm keeps (their activation) and are left as they are
_PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _is_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _frozen_roots(model: nn.Module) -> list[str]:
    """Names of the subtrees never synchronised: modules with no trainable parameter, frozen
    feature extractors among them (their BatchNorms run on fixed statistics)."""
    return [name for name, module in model.named_modules() if name and not _is_trainable(module)]


def _runs_on_cpu(model: nn.Module) -> bool:
    trainer = getattr(model, "_trainer", None)
    if trainer is not None:
        return trainer.strategy.root_device.type == "cpu"
    first = next(model.parameters(), None)
    return first is None or first.device.type == "cpu"


class TrainableSyncBatchNorm(TorchSyncBatchNorm):
    """Lightning's SyncBatchNorm plugin, restricted to the BatchNorms that train.

    Lightning's own (`Trainer(sync_batchnorm=True)`) converts every BatchNorm of the module:
    frozen backbones too, and timm's BatchNormAct2d loses its activation in the conversion,
    which silently changes the frozen features. This one converts only plain torch BatchNorms
    outside frozen feature extractors and outside modules with no trainable parameter, and
    `revert` restores exactly those. SyncBatchNorm has no CPU (gloo) kernel: on a CPU run it
    converts nothing and logs why, so `trainer=ddp trainer.accelerator=cpu` trains with
    per-rank BatchNorm statistics instead of failing.
    """

    def __init__(self) -> None:
        self._converted: dict[str, type[nn.Module]] = {}

    def candidates(self, model: nn.Module) -> list[str]:
        """Names of the BatchNorms `apply` synchronises (on an accelerator)."""
        frozen = _frozen_roots(model)
        names = []
        for name, module in model.named_modules():
            if any(name == root or name.startswith(f"{root}.") for root in frozen):
                continue
            if type(module) in _PLAIN_BATCHNORMS:
                names.append(name)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                log.warning(
                    "sync BatchNorm: %s (%s) is left per-rank: converting it would drop what "
                    "it adds to BatchNorm",
                    name,
                    type(module).__name__,
                )
        return names

    @override
    def apply(self, model: nn.Module) -> nn.Module:
        names = self.candidates(model)
        if names and _runs_on_cpu(model):
            log.warning(
                "sync BatchNorm off on CPU (SyncBatchNorm needs a GPU): %d trainable BatchNorm "
                "layers keep per-rank statistics; trainer.plugins=null silences this",
                len(names),
            )
            return model
        self._converted = {}
        for name in names:
            module = model.get_submodule(name)
            self._converted[name] = type(module)
            _replace(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(module))
        log.info("sync BatchNorm: %d trainable BatchNorm layers synchronised", len(names))
        return model

    @override
    def revert(self, model: nn.Module) -> nn.Module:
        for name, kind in self._converted.items():
            synced = model.get_submodule(name)
            plain = kind(
                synced.num_features,
                synced.eps,
                synced.momentum,
                synced.affine,
                synced.track_running_stats,
            )
            plain.load_state_dict(synced.state_dict())
            plain.to(next(iter(synced.state_dict().values())).device)
            plain.train(synced.training)
            _replace(model, name, plain)
        self._converted = {}
        return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
