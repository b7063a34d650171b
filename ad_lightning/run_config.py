"""The config a resume or a re-score runs with: the run's own, plus the overrides that are safe.

`resume=RUN` and `test_only=RUN` used to run with whatever the command line composed, so a
re-score without the run's overrides scored another dataset and wrote over the run's results.
They now start from the config the run folder holds (results.json's `config`, else Hydra's
.hydra/config.yaml). An override given on top is applied where it only changes how the run is
carried out (trainer budget and devices, loggers, callbacks; for a re-score also the evaluation
settings); any other override that differs from the run is refused, naming the key.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from ad_lightning.deploy.trusted import locate_within
from ad_lightning.results import read_results

#: never compared: the run mode itself and where this invocation writes
IGNORED = ("resume", "test_only", "skip_done", "paths", "hydra")
#: overrides applied on top of the run's config, per mode
#: (`data.root`: the same files elsewhere, which the split digests check, train.py)
SAFE = {
    "resume": ("trainer", "logger", "callbacks", "feature_store", "eval.n_heatmaps", "data.root"),
    "test": ("trainer", "logger", "callbacks", "feature_store", "eval", "protocol", "data.root"),
}
_ABSENT = object()


#: the packages whose classes a run folder's config may build on resume or re-score: ours,
#: Lightning's (trainer, loggers, callbacks, strategies, plugins) and albumentations' transforms
RUN_PACKAGES = ("ad_lightning", "pytorch_lightning", "lightning", "albumentations")
#: where those classes may be defined (Lightning's plugins and environments live in lightning_fabric)
CLASS_MODULES = (*RUN_PACKAGES, "lightning_fabric")
#: the resolvers a run folder's Hydra config (.hydra/config.yaml) may call when it is read: pure
#: functions of the config and the machine. Any other is refused: `oc.env` would copy this
#: machine's secrets into results.json and W&B, `oc.create` builds nodes, `ad.unique_dir` makes
#: folders (it only serves `paths`, which the current invocation's replace)
PURE_RESOLVERS = (
    "ad.wandb_offline",
    "ad.input_normalization",
    "ad.tasks_per_node",
    "ad.gpus_per_node",
    "oc.select",
)
RESOLVER_CALL = re.compile(r"\$\{\s*([^\s:{}]+)\s*:")


class UntrustedRunFolder(ValueError):
    """A run folder's config or checkpoint would build or run something other than the
    classes a run of ours builds."""


def check_targets(node: Any, folder: Path, given: tuple[str, ...] = (), where: str = "") -> None:
    """Every `_target_` in a run folder's config names a class defined in RUN_PACKAGES:
    resume and test_only build what the folder's config names, and a folder from elsewhere is
    data (it could name `os.system`, or `subprocess.Popen` through a module of ours that
    imports it). Modules outside those packages are never imported. Hydra's other special keys
    (`_args_`, `_partial_`, ...) and interpolations (`${...}`, which can create nodes when the
    config is resolved) never occur in the resolved configs runs write, and are refused. The
    keys under `given` are the command line's (`+callbacks.mine=null` drops a callback of the
    run's own that is not ours), not the folder's."""
    if isinstance(node, dict):
        for key, value in node.items():
            at = f"{where}.{key}" if where else str(key)
            if _under(at, given) or (not where and key in IGNORED):
                continue  # the command line's, or never built (replaced by this invocation's)
            if key == "_target_":
                obj = locate_within(value, RUN_PACKAGES) if isinstance(value, str) else None
                if not (isinstance(obj, type) and _under(obj.__module__, CLASS_MODULES)):
                    raise _untrusted(
                        folder, f"{at}={value!r} is not a class of {', '.join(RUN_PACKAGES)}"
                    )
            elif isinstance(key, str) and key.startswith("_"):
                raise _untrusted(folder, f"{at} is Hydra's special key {key!r}")
            else:
                check_targets(value, folder, given, at)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_targets(value, folder, given, f"{where}[{i}]")
    elif isinstance(node, str) and "${" in node:
        raise _untrusted(folder, f"{where}={node!r} is an interpolation")


def _untrusted(folder: Path, what: str) -> UntrustedRunFolder:
    return UntrustedRunFolder(
        f"{folder}: its config's {what}: it is not built (a run folder from elsewhere is data)"
    )


def _impure_resolvers(node: Any, where: str = "") -> list[str]:
    """`key=value` for each value of an unresolved config that calls a resolver outside
    PURE_RESOLVERS."""
    if isinstance(node, dict):
        return [
            found
            for key, value in node.items()
            for found in _impure_resolvers(value, f"{where}.{key}" if where else str(key))
        ]
    if isinstance(node, list):
        return [f for i, v in enumerate(node) for f in _impure_resolvers(v, f"{where}[{i}]")]
    if isinstance(node, str) and any(
        name not in PURE_RESOLVERS for name in RESOLVER_CALL.findall(node)
    ):
        return [f"{where}={node!r}"]
    return []


def saved_config(folder: Path) -> dict[str, Any]:
    """The resolved config of the run in `folder`."""
    try:
        config = read_results(folder / "results.json").get("config")
    except (OSError, json.JSONDecodeError):
        config = None
    if isinstance(config, dict) and "model" in config:
        return config
    hydra_file = folder / ".hydra" / "config.yaml"
    if hydra_file.is_file():
        # read as data: the nodes this invocation replaces are dropped unresolved, and the rest
        # may call only pure resolvers before it is resolved
        config = OmegaConf.to_container(OmegaConf.load(hydra_file), resolve=False)
        for key in IGNORED:
            config.pop(key, None)  # type: ignore[union-attr]
        impure = _impure_resolvers(config)
        if impure:
            raise _untrusted(
                hydra_file, f"{impure[0]} calls a resolver that is not one of {PURE_RESOLVERS}"
            )
        return OmegaConf.to_container(OmegaConf.create(config), resolve=True)  # type: ignore[return-value]
    raise FileNotFoundError(
        f"{folder} holds no config of its run (results.json 'config' or .hydra/config.yaml)"
    )


def override_keys(overrides: list[str] | None, current: dict, saved: dict) -> list[str]:
    """The dotted keys the command line set. Unknown overrides (compose API without the Hydra
    node), or a group that is not a config key (experiment=...), count every differing key."""
    keys: set[str] = set()
    unknown = overrides is None
    for override in OverridesParser.create().parse_overrides(overrides or []):
        key = override.key_or_group
        if key.split(".")[0].split("/")[0] in IGNORED:
            continue
        if "/" in key or key.split(".")[0] not in current and key.split(".")[0] not in saved:
            unknown = True
        else:
            keys.add(key)
    if unknown:
        keys |= {k for k in _differing(current, saved) if k.split(".")[0] not in IGNORED}
    return sorted(keys)


def merge_run_config(
    mode: str, folder: Path, cfg: DictConfig, overrides: list[str] | None
) -> DictConfig:
    """The run's config with the safe overrides on top; a ValueError names an unsafe one."""
    flag = "resume" if mode == "resume" else "test_only"
    saved = saved_config(folder)
    current: dict = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    merged = json.loads(json.dumps(saved))  # a deep copy
    refused, given = [], []
    for key in override_keys(overrides, current, saved):
        new, old = _get(current, key), _get(saved, key)
        if new == old:
            continue
        if _under(key, SAFE[mode]):
            _set(merged, key, new)
            given.append(key)
            continue
        leaf = next(iter(_differing(new, old, key)), key) if isinstance(new, dict) else key
        refused.append(
            f"{flag}={folder}: {leaf}={_show(_get(current, leaf))} differs from the run's "
            f"{leaf}={_show(_get(saved, leaf))}; drop the override"
        )
    if refused:
        raise ValueError("\n".join(refused))
    check_targets(merged, folder, tuple(given))
    for key in IGNORED[:4]:
        merged[key] = current.get(key)
    merged.pop("hydra", None)  # Hydra's own node is never the folder's to give
    return OmegaConf.create(merged)


#: what two launches of one job may differ in without being two jobs: where and how a run is
#: logged and shown
PLACEMENT = ("logger", "trainer.enable_progress_bar", "trainer.enable_model_summary")


def one_device(devices: Any) -> Any:
    """`trainer.devices` as a setting: a joblib launcher pins each job of a multi-GPU machine
    to one GPU (`[0]`, `[1]`, ...), which is where the run went, not another setting; the
    number of devices (DDP: another effective batch) is one."""
    return 1 if isinstance(devices, list) and len(devices) == 1 else devices


def job_differences(cfg: DictConfig, saved: dict[str, Any]) -> list[str]:
    """The keys where `cfg` is another job than the run whose resolved config is `saved`,
    beside those in IGNORED and PLACEMENT and the GPU a one-device job was pinned to. A key on
    one side only (a default that a later version added or dropped) is not compared."""
    current: dict = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    differing = []
    for key in _differing(current, saved):
        if key.split(".")[0] in IGNORED or _under(key, PLACEMENT):
            continue
        new, old = _get(current, key), _get(saved, key)
        if new is _ABSENT or old is _ABSENT:
            continue
        if key == "trainer.devices" and one_device(new) == one_device(old):
            continue
        differing.append(key)
    return differing


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _show(value: Any) -> str:
    return "<absent>" if value is _ABSENT else str(value)


def _get(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _ABSENT
        tree = tree[part]
    return tree


def _set(tree: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    if value is _ABSENT:
        tree.pop(last, None)
    else:
        tree[last] = value


def _differing(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys of the leaves where two config trees differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = list(a) + [k for k in b if k not in a]
        return [
            d
            for k in keys
            for d in _differing(
                a.get(k, _ABSENT), b.get(k, _ABSENT), f"{prefix}.{k}" if prefix else k
            )
        ]
    return [] if a == b else [prefix]
