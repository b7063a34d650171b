"""Per-image random draws for scoring: the same image gets the same noise in any batch and run.

A score that samples (a VAE's z, AnoGAN's starting latent) must not depend on the global RNG
or on the image's position in its batch, or the same test set scores differently run to run.
Each image's draws come from its own CPU generator, seeded from a fixed seed and the image's
path (else its dataset index, else its pixels), so they are also the same on CPU and GPU.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch


def _stable_hash(seed: int, key: bytes) -> int:
    """A 63-bit seed from `seed` and `key`; Python's hash() is salted per process."""
    digest = hashlib.blake2b(key, digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def image_seeds(batch: dict[str, Any], seed: int) -> list[int]:
    """One seed per image of a batch, from its path, else its dataset index, else its pixels."""
    images = batch["image"]
    if "path" in batch:
        keys = [str(p).encode() for p in batch["path"]]
    elif "index" in batch:
        keys = [f"index:{int(i)}".encode() for i in torch.as_tensor(batch["index"]).tolist()]
    else:
        keys = [x.detach().float().cpu().numpy().tobytes() for x in images]
    if len(keys) != len(images):
        raise ValueError(f"batch has {len(images)} images but {len(keys)} paths / indices")
    return [_stable_hash(seed, key) for key in keys]


def per_image_normal(
    seeds: Sequence[int],
    shape: Sequence[int],
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal draws of `shape` per image, stacked on dim 0 (B, *shape)."""
    draws = [
        torch.randn(tuple(shape), generator=torch.Generator().manual_seed(s), dtype=dtype)
        for s in seeds
    ]
    return torch.stack(draws).to(device)
