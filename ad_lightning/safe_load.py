"""Loading a file from elsewhere (a model file, a run folder's checkpoint, a weights file) as
data: `torch.load(weights_only=True)`, and only with a torch whose weights-only loading a
crafted file cannot make run code (CVE-2025-32434, fixed in torch 2.6)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

#: the first torch whose weights-only loading runs no code from a crafted file
SAFE_TORCH = (2, 6)


class UnsafeLoader(ValueError):
    """This torch could run code while unpickling a file, so the file is not loaded."""


def require_safe_loader(path: Path | str, version: str | None = None) -> None:
    """Refuse to unpickle `path` with a torch older than SAFE_TORCH, naming the file, the
    version and the fix (pyproject's floor keeps a fresh install above it; an environment
    that already held an older torch may not be)."""
    version = version or torch.__version__
    found = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if found < SAFE_TORCH:
        floor = ".".join(map(str, SAFE_TORCH))
        raise UnsafeLoader(
            f"{path}: not loaded with torch {version}, whose weights-only loading can run code "
            f"from a crafted file (CVE-2025-32434); pip install 'torch>={floor}'"
        )


def load_weights_only(path: Path | str) -> Any:
    """`torch.load` of tensors and plain values only, on the CPU, with a safe torch."""
    require_safe_loader(path)
    return torch.load(path, map_location="cpu", weights_only=True)
