"""Albumentations pipelines: resize, optional train augmentations, normalisation, tensor."""

from __future__ import annotations

import random
from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalization(kind: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Mean/std for `kind`: imagenet (pretrained backbones), half ([-1, 1], GANs) or none ([0, 1])."""
    if kind == "none":
        return None
    if kind == "half":
        return (0.5,) * channels, (0.5,) * channels
    if kind == "imagenet":
        if channels == 3:
            return IMAGENET_MEAN, IMAGENET_STD
        return (sum(IMAGENET_MEAN) / 3,) * channels, (sum(IMAGENET_STD) / 3,) * channels
    raise ValueError(f"data.normalize={kind!r} is unknown; use imagenet, half or none")


def build_transform(
    image_size: int | Sequence[int],
    channels: int,
    normalize: str = "imagenet",
    augmentations: Sequence[A.BasicTransform] = (),
    seed: int | None = None,
) -> A.Compose:
    """Resize (masks with nearest neighbour), augment, normalise and convert to CHW tensors.

    `seed` seeds albumentations' own random state (it does not follow numpy's or torch's
    global seed), so the same run seed gives the same augmented images (`reseed`)."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    steps: list[A.BasicTransform] = [
        A.Resize(h, w, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST)
    ]
    steps += list(augmentations)
    stats = normalization(normalize, channels)
    if stats is None:
        steps.append(A.ToFloat(max_value=255.0))
    else:
        steps.append(A.Normalize(mean=stats[0], std=stats[1], max_pixel_value=255.0))
    steps.append(ToTensorV2())
    compose = A.Compose(steps)
    if seed is not None:
        reseed(compose, seed)
    return compose


def reseed(transform: A.Compose, seed: int) -> None:
    """One random stream for the whole pipeline, seeded with `seed`. Albumentations' own
    seeding (`Compose(seed=)`, `set_random_seed`) gives each transform a generator of the same
    seed, so their draws coincide: a HorizontalFlip and a VerticalFlip of the same p flipped
    both ways or neither, never one (200 of 200 seeds here); drawn from one stream they are
    independent."""
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
