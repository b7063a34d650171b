"""BatchNorm folded into the convolution before it, for a frozen network in eval mode.

In eval mode a BatchNorm is a per-channel affine map, which the preceding convolution's weights
and bias can absorb. On the CPU each BatchNorm is otherwise a full pass over its activation
(memory-bound), which for EfficientNet-Lite0 costs as much as the convolutions: folded, the
same features take half the time (see FeatureExtractor.inference_net).
"""

from __future__ import annotations

import copy
import logging
from itertools import pairwise

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

log = logging.getLogger(__name__)

#: largest difference allowed between the folded and the plain network's output, relative to
#: the output's largest magnitude, for fp32 weights and for 16-bit ones (rounding is about
#: 1e-6 and 1e-2 there; a fold that changed what is computed differs by order 1)
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4}
TOLERANCE_16_BIT = 5e-2


def fold_in_place(module: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d among its siblings (the order
    timm and torchvision define, and run, their blocks in). A timm BatchNormAct2d keeps its
    dropout and activation. Returns how many were folded."""
    folded = 0
    for first, second in pairwise(list(module._modules)):
        conv, norm = module._modules[first], module._modules[second]
        if not (isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d)):
            continue
        if norm.running_mean is None or norm.running_var is None:
            continue  # batch statistics even in eval mode: not an affine map
        module._modules[first] = fuse_conv_bn_eval(conv, norm)
        after = [getattr(norm, name, None) for name in ("drop", "act")]
        after = [m for m in after if m is not None]
        module._modules[second] = nn.Sequential(*after) if after else nn.Identity()
        folded += 1
    for child in module.children():
        folded += fold_in_place(child)
    return folded


def own_hooks(net: nn.Module) -> tuple[int, ...]:
    """The ids of the hooks registered on `net` itself: a copy built before one was added or
    removed runs another set."""
    return (*net._forward_pre_hooks, *net._forward_hooks)


@torch.no_grad()
def folded_copy(net: nn.Module, probe: torch.Tensor) -> nn.Module:
    """A copy of `net` (eval mode) with its BatchNorms folded, or `net` itself when nothing
    folds or the copy does not compute what `net` does on `probe`: the fold assumes that a
    convolution feeds the BatchNorm defined after it, which an unusual block could break.
    The hooks on `net` itself are shared with the copy, not copied (a bound method's object
    would be)."""
    shared = [*net._forward_pre_hooks.values(), *net._forward_hooks.values()]
    copied = copy.deepcopy(net, {id(hook): hook for hook in shared}).eval()
    if not fold_in_place(copied):
        return net
    try:
        # forward() itself: hooks on `net` (counting the images it sees) are not run for the
        # probe; autocast off, so that the check compares the weights' own precision
        with torch.autocast(probe.device.type, enabled=False):
            want, got = net.forward(probe), copied.forward(probe)
        want, got = (want, got) if isinstance(want, list | tuple) else ([want], [got])
        tolerance = TOLERANCE.get(next(net.parameters()).dtype, TOLERANCE_16_BIT)
        same = all(
            bool((a - b).abs().max() <= tolerance * max(float(a.abs().max()), 1.0))
            for a, b in zip(want, got, strict=True)
        )
    except Exception as err:  # noqa: BLE001 - the plain net computes the features all the same
        log.warning("BatchNorm folding failed on %s (%s); it runs unfolded", type(net), err)
        return net
    if not same:  # NaN differences included
        log.warning("BatchNorm folding changed %s's output; it runs unfolded", type(net))
        return net
    return copied
