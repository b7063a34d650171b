"""A fingerprint of tensors: what tells a checkpoint's frozen backbone, or an exported graph's
model file, apart from another one with the same names and shapes."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch


def state_digest(state: Mapping[str, torch.Tensor], extra: str = "") -> str:
    """SHA-256 of each entry's name and bytes (layout-independent: contiguous first), then
    `extra` (plain facts beside the tensors, e.g. JSON)."""
    h = hashlib.sha256()
    for key, tensor in state.items():
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    h.update(extra.encode())
    return h.hexdigest()
