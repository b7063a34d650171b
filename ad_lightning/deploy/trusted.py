"""Which classes a model file may build: ours, and nothing else.

A model file names the classes it is rebuilt from (`_target_` keys of its stored config),
and `hydra.utils.instantiate` calls whatever it names. A file from elsewhere could name
`shutil.copyfile` or `builtins.open` and act on the machine that loads it. So before
anything is built, every `_target_` at any depth must name a method (an `AnomalyModule`
subclass of `ad_lightning.models`) or a backbone module of `ad_lightning.backbones`; the
set follows the code, so a new method is allowed without being listed anywhere. Hydra's
other special keys (`_args_`, `_partial_`, `_convert_`, `_recursive_`) and interpolations
(`${...}`, which Hydra resolves and which can create configs) never occur in the configs
runs write, and are refused.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from torch import nn

from ad_lightning.models.base import AnomalyModule

METHOD_PACKAGE = "ad_lightning.models"
BACKBONE_PACKAGE = "ad_lightning.backbones"


class UntrustedModelFile(ValueError):
    """A model file's config would build something other than our own classes."""


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(f"{package}.")


def locate_within(target: str, packages: tuple[str, ...]) -> Any:
    """The object a dotted name inside `packages` refers to, importing only modules of those
    packages; None when it names none (a foreign name is never imported)."""

    def inside(name: str) -> bool:
        return any(_within(name, package) for package in packages)

    if not inside(target):
        return None
    parts = target.split(".")
    for split in range(len(parts), 0, -1):
        module_name = ".".join(parts[:split])
        if not inside(module_name):
            return None
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if not _within(target, err.name or ""):  # one of ours failed to import: say so
                raise
            continue
        try:
            for attribute in parts[split:]:
                obj = getattr(obj, attribute)
        except AttributeError:
            return None
        return obj
    return None


def locate_own(target: str) -> Any:
    """`locate_within` our methods' and backbones' packages."""
    return locate_within(target, (METHOD_PACKAGE, BACKBONE_PACKAGE))


def is_method(obj: Any) -> bool:
    return (
        isinstance(obj, type)
        and issubclass(obj, AnomalyModule)
        and _within(obj.__module__, METHOD_PACKAGE)
    )


def is_backbone(obj: Any) -> bool:
    return (
        isinstance(obj, type)
        and issubclass(obj, nn.Module)
        and _within(obj.__module__, BACKBONE_PACKAGE)
    )


def _refuse(path: Path, where: str, what: str) -> UntrustedModelFile:
    return UntrustedModelFile(
        f"{path}: refusing to load: {where} {what}. A model file may only build ad_lightning "
        "methods (ad_lightning.models) and backbones (ad_lightning.backbones) from plain "
        "values; this file was not written by an ad_lightning run or has been altered"
    )


def _checked(node: Any, path: Path, where: str) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            here = f"{where}.{key}"
            if key == "_target_":
                if not isinstance(value, str):
                    raise _refuse(path, here, f"is {value!r}, not a class name")
                cls = locate_own(value)
                if not (is_method(cls) or is_backbone(cls)):
                    raise _refuse(path, here, f"names {value!r}")
                out[key] = f"{cls.__module__}.{cls.__qualname__}"  # exactly the class checked
            elif isinstance(key, str) and key.startswith("_"):
                raise _refuse(path, here, f"uses the special key {key!r}")
            else:
                out[key] = _checked(value, path, here)
        return out
    if isinstance(node, list | tuple):
        return [_checked(v, path, f"{where}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:
        raise _refuse(path, where, f"holds the interpolation {node!r}")
    return node


def trusted_model_config(config: Any, path: Path) -> dict[str, Any]:
    """The stored model config, checked to build only our classes (each `_target_` spelled
    as the class it was checked against); raises UntrustedModelFile naming the file and
    the offending key or target otherwise. Nothing is built or imported outside our
    packages."""
    if not isinstance(config, dict) or "_target_" not in config:
        raise _refuse(path, "model_config", "is not a method's config (no _target_)")
    checked = _checked(config, path, "model_config")
    if not is_method(locate_own(checked["_target_"])):
        raise _refuse(path, "model_config._target_", f"names {config['_target_']!r}, not a method")
    return checked
