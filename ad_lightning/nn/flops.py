"""FLOPs per image of a module, counted by torch.utils.flop_counter (convolutions, matmuls)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def flops_per_image(module: nn.Module, example: torch.Tensor) -> int:
    """Forward FLOPs of `module` for one image of the shape of `example` ([1, ...] or [B, ...])."""
    was_training = module.training
    module.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            module(example[:1])
    finally:
        module.train(was_training)
    return int(counter.get_total_flops())
