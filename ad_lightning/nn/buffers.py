"""Loading buffers whose shape is only known once fitted, or that older files lack.

A fitted bank, a covariance or a threshold is a buffer sized at fit time (empty before), so
`load_state_dict` must size it from what the file stores before copying; and a file written
before a buffer existed must still load strictly, keeping the buffer as it is (unset), when
the feature it serves is off there. One function does both for every module that needs it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn


def buffers_from_state(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    names: Iterable[str] | None = None,
    keep_missing: bool = False,
) -> dict[str, Any]:
    """Resize `module`'s buffers `names` (default: all) to the shapes `state_dict` stores; with
    `keep_missing`, return the state dict with each buffer it lacks filled in by the buffer's
    current value, so that a strict load keeps it instead of failing."""
    missing = {}
    for name in list(module._buffers) if names is None else names:
        buf, stored = module._buffers[name], state_dict.get(prefix + name)
        if stored is None:
            if keep_missing:
                missing[prefix + name] = buf
        elif buf is not None and stored.shape != buf.shape:
            module._buffers[name] = buf.new_empty(stored.shape)
    return {**state_dict, **missing} if missing else state_dict
