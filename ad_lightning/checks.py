"""Validation of string-valued config knobs, shared by data, networks and methods.

Every enumerated knob (model.score, model.loss, data.register_method, ...) is checked here
when its object is built, so a typo on the command line fails before any data is read, with
one message form that names the config key and lists what is allowed.
"""

from __future__ import annotations

from collections.abc import Collection


def choice(key: str, value: str, allowed: Collection[str]) -> str:
    """Return `value` if it is one of `allowed`; else a ValueError naming the config key."""
    if value not in allowed:
        raise ValueError(f"{key}={value!r}: use one of {list(allowed)}")
    return value
