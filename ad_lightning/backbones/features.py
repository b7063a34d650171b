"""Frozen timm feature extractor: chosen blocks, resized to one size and concatenated.

Block b is the stage whose output is downsampled 2**(b+1) times (ResNeXt layer1..layer4 are
blocks 1..4), so `blocks: [1, 2, 3]` means the same stages for every timm backbone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from ad_lightning.backbones.weights import resolve_weights
from ad_lightning.nn.digest import state_digest
from ad_lightning.nn.fold_batchnorm import folded_copy, own_hooks

log = logging.getLogger(__name__)


class BackboneChanged(ValueError):
    """A frozen backbone, rebuilt from its config and weights source, is not the one a
    checkpoint was fitted on (another weights file or package version at the same name)."""


#: data.normalize's values, each a (mean, std) the images reach a backbone with
NORMALIZE_KINDS = ("imagenet", "half", "none")


def normalize_for(stats: tuple[Sequence[float], Sequence[float]]) -> str | None:
    """The data.normalize that feeds a backbone the (mean, std) its weights were trained with
    (to the third decimal), None when none of them does."""
    from ad_lightning.data.transforms import normalization

    for kind in NORMALIZE_KINDS:
        fed = normalization(kind, 3) or ((0.0,) * 3, (1.0,) * 3)  # none: images in [0, 1]
        if all(
            len(a) == len(b) and np.allclose(a, b, atol=1e-3)
            for a, b in zip(fed, stats, strict=True)
        ):
            return kind
    return None


def normalization_mismatch(backbone: FeatureExtractor, normalize: str) -> str | None:
    """Why `data.normalize` does not feed a pretrained backbone the statistics its weights
    were trained with (ImageNet's for most, mean = std = 0.5 for Xception), naming the fix;
    None when it does. Fed others, its features are distorted without a word."""
    if backbone.input_stats is None or not backbone.pretrained:
        return None
    fits = normalize_for(backbone.input_stats)
    if fits == normalize:
        return None
    mean, std = backbone.input_stats
    fix = (
        f"set data.normalize={fits}"
        if fits
        else "pick a backbone trained on inputs that data.normalize can give"
    )
    return (
        f"backbone={backbone.alias} ({backbone.name}) was pretrained on images normalised with "
        f"mean {mean} and std {std}, but data.normalize={normalize} feeds it others, which "
        f"distorts its features: {fix}"
    )


class FeatureExtractor(nn.Module):
    """FE(x) of Skip-DFR/DFR: frozen, always in eval mode, blocks concatenated channel-wise."""

    def __init__(
        self,
        name: str = "efficientnet_lite0",
        blocks: Sequence[int] = (1, 2, 3),
        pretrained: bool = True,
        weights: str | None = None,
        allow_download: bool = True,
        feature_size: int | None = None,
        alias: str | None = None,
        channels_last: bool = True,
        bundled: bool = False,
    ) -> None:
        super().__init__()
        self.name = name
        self.alias = alias or name
        self.blocks = sorted(int(b) for b in blocks)
        if not self.blocks:
            raise ValueError("backbone.blocks is empty; pick stages such as [1, 2, 3]")
        probe = timm.create_model(name, features_only=True, pretrained=False)
        pretrained_cfg = getattr(probe, "pretrained_cfg", None) or {}
        #: the input mean and std its pretrained weights were trained with (timm's record)
        self.input_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = (
            (tuple(pretrained_cfg["mean"]), tuple(pretrained_cfg["std"]))
            if pretrained_cfg.get("mean") and pretrained_cfg.get("std")
            else None
        )
        reductions = probe.feature_info.reduction()
        indices = []
        for block in self.blocks:
            if 2 ** (block + 1) not in reductions:
                raise ValueError(
                    f"backbone.blocks={list(blocks)}: {name} has no block {block} (stride {2 ** (block + 1)}); its strides are {reductions}"
                )
            indices.append(reductions.index(2 ** (block + 1)))
        self.net = timm.create_model(
            name, features_only=True, pretrained=False, out_indices=indices
        )
        self._drop_unused_blocks()
        self.pretrained = bool(pretrained)
        if bundled:  # a model file holds these weights: they are loaded after construction
            self.weights_source = "model file"
        elif self.pretrained:
            full = timm.create_model(name, pretrained=False)
            self.weights_source = resolve_weights(full, name, weights, allow_download)
            missing, _ = self.net.load_state_dict(full.state_dict(), strict=False)
            if missing:
                raise RuntimeError(
                    f"{name}: feature extractor keys missing from the loaded weights: {missing[:5]}"
                )
            log.info(
                "backbone %s blocks %s: ImageNet weights from %s",
                name,
                self.blocks,
                self.weights_source,
            )
        else:
            self.weights_source = "random"
            log.warning(
                "backbone %s uses RANDOM weights (backbone.pretrained=false); results.json records this",
                name,
            )
        self.channels = [probe.feature_info.channels()[i] for i in indices]
        self.out_channels = sum(self.channels)
        self.feature_size = feature_size
        # NHWC convolutions: about 2x faster on CPU for these depthwise-separable nets (measured)
        self.channels_last = channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.train(False)
        self._digest: str | None = None
        self.__dict__["_folded"] = None  # not a submodule: state_dict holds `net` alone
        # weights loaded later (a model file's) make the digest and the folded net stale; the
        # hook gets the module it fires for, so a deep copy forgets its own
        self.register_load_state_dict_post_hook(lambda module, _: module._forget_derived())

    def _forget_derived(self) -> None:
        self._digest = None
        self.__dict__["_folded"] = None

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - torch's signature
        self.__dict__["_folded"] = None  # .to(device), .half(), ...: folded again on next use
        return super()._apply(fn, recurse)

    def inference_net(self, images: torch.Tensor) -> nn.Module:
        """`net` with each BatchNorm folded into the convolution before it: the same features
        (float rounding apart) in about half the time on the CPU (Lite0 blocks 1-3, 256 px,
        batch 32: 19-21 -> 10.8 ms per image, measured). Built on first use from `net` as it
        then is, checked against `net` on two of the images, and built again after weights
        load, the module moves, or a hook is added to or removed from `net` (in-place edits
        of the weights are not seen: load them instead).
        `net` keeps the weights that state_dict, the digest and model files hold; an export
        traces `net` itself (onnxruntime folds on its own)."""
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return self.net
        hooks = own_hooks(self.net)
        if self.__dict__["_folded"] is None or self.__dict__.get("_folded_hooks") != hooks:
            self.__dict__["_folded"] = folded_copy(self.net, images[:2])
            self.__dict__["_folded_hooks"] = hooks
        return self.__dict__["_folded"]

    def _drop_unused_blocks(self) -> None:
        """timm's EfficientNet / MobileNet feature nets run every block, also those past the
        deepest chosen one; their outputs are thrown away. Cut them: same features, 20-25 %
        less time for Lite0 blocks 1-3 at 256 px (measured). Other timm feature nets already
        stop at their last chosen stage."""
        stage_out = getattr(self.net, "_stage_out_idx", None)
        blocks = getattr(self.net, "blocks", None)
        hooks = getattr(self.net, "feature_hooks", None)
        if stage_out and isinstance(blocks, nn.Sequential) and hooks is None:
            self.net.blocks = blocks[: max(stage_out)]

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Stay in eval mode: BatchNorm statistics of a frozen backbone must not drift."""
        super().train(False)
        return self

    def digest(self) -> str:
        """SHA-256 of the weights and buffers, layout-independent. Checkpoints leave the frozen
        backbone out and rebuild it from its config and weights source, so they record this
        to tell whether the rebuild still computes the features the rest was fitted on.
        Computed once (ResNeXt101 holds 340 MB), again after a `load_state_dict`."""
        if self._digest is None:
            self._digest = state_digest(self.state_dict())
        return self._digest

    def describe(self) -> dict:
        return {
            "name": self.alias,
            "timm_name": self.name,
            "blocks": self.blocks,
            "pretrained": self.pretrained,
            "weights": self.weights_source,
        }

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] != 3:
            raise ValueError(
                f"backbone {self.alias} expects 3-channel images but got {images.shape[1]}; keep data.channels=3 (grayscale is expanded) for ImageNet backbones."
            )
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        maps = self.inference_net(images)(images)
        size = self.feature_size or maps[0].shape[-2:]
        size = (size, size) if isinstance(size, int) else tuple(size)
        maps = [
            m
            if m.shape[-2:] == size
            else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            for m in maps
        ]
        return torch.cat(maps, dim=1).contiguous()
