"""Validation of a composed config by key name, before anything is built.

A missing mandatory key or a number out of range otherwise surfaces deep inside Hydra's
instantiate or a library (a 100-line traceback naming no key), or worse, is taken silently
(`model.sigma=-3` turned smoothing off). `validate(cfg)` checks the composed config first and
raises one `ConfigError` that lists every bad key with its value and what is allowed.

Two sources of rules: the declarative table `RULES` (dotted key pattern -> type and range)
for the knobs users sweep, and the type annotations of the `_target_` class of `data` and
`model` (a string where `__init__` annotates a number is named as `model.<param>`).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from types import NoneType, UnionType
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

SECTIONS = ("data", "model", "trainer", "eval", "feature_store", "backbone")
#: the sections whose values are checked against their `_target_`'s __init__ annotations
TYPED_SECTIONS = ("data", "model", "backbone", "trainer")
#: switches without a `_target_` to annotate them: a typo (`skip_done=flase`) is a truthy string
FLAGS = ("skip_done", "feature_store.enabled")


class ConfigError(ValueError):
    """A composed config that cannot run; the message names each bad key."""


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


@dataclass(frozen=True)
class Rule:
    """`pattern` (fnmatch on the dotted key) must hold a `kind` number in [low, high]
    (`open_low`/`open_high`: bound excluded), or one of `also` (special values)."""

    pattern: str
    kind: type
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    also: tuple[float, ...] = ()
    note: str = ""

    def allowed(self) -> str:
        """The range in words: `must be >= 0`, `must be in (0, 1]`, `must be >= 1 or -1`."""
        if self.low is not None and self.high is not None:
            text = (
                f"in {'(' if self.open_low else '['}{_num(self.low)}, "
                f"{_num(self.high)}{')' if self.open_high else ']'}"
            )
        elif self.low is not None:
            text = f"{'>' if self.open_low else '>='} {_num(self.low)}"
        elif self.high is not None:
            text = f"{'<' if self.open_high else '<='} {_num(self.high)}"
        else:
            text = "any value"
        text = f"must be {'an integer' if self.kind is int else 'a number'} {text}"
        if self.also:
            text += " or " + " or ".join(map(_num, self.also))
        return text + (f" ({self.note})" if self.note else "")

    def accepts(self, value: float) -> bool:
        if value in self.also:
            return True
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return not (
            self.high is not None and (value >= self.high if self.open_high else value > self.high)
        )


#: the numeric knobs users sweep; the first matching pattern decides
RULES: tuple[Rule, ...] = (
    Rule("data.image_size", int, 1, note="pixels; a list gives height, width"),
    Rule("data.batch_size", int, 1),
    Rule("data.eval_batch_size", int, 1),
    Rule("data.num_workers", int, 0, note="0 loads in the main process"),
    Rule("data.val_split", float, 0, 1, open_high=True, note="fraction of normal train images"),
    Rule("data.contamination", float, 0, 1, note="fraction of the training-set size"),
    Rule("model.sigma", float, 0, note="0 turns smoothing off"),
    Rule("model.ssim_sigma", float, 0, open_low=True),
    Rule("model.*lr", float, 0, open_low=True, note="learning rate"),
    Rule("model.weight_decay", float, 0),
    Rule("model.momentum", float, 0, 1, open_high=True),
    Rule("model.beta[12]", float, 0, 1, open_high=True),
    Rule("model.coreset_ratio", float, 0, 1, open_low=True, note="fraction of patches kept"),
    Rule("model.pca_variance", float, 0, 1, open_low=True),
    Rule("model.pca_images", int, 1),
    Rule("model.k", int, 1, note="neighbours"),
    Rule("model.num_neighbours", int, 1),
    Rule("model.image_size", int, 1),
    Rule("model.batch_size", int, 1),
    Rule("model.latent_dim", int, 1),
    Rule("model.stats_images", int, 1),
    Rule("model.global_images", int, 1, note="null = every training image"),
    Rule("model.latent_steps", int, 0),
    Rule("model.n_samples", int, 1),
    Rule("trainer.max_epochs", int, 1, also=(-1,), note="-1: no epoch limit"),
    Rule("trainer.max_steps", int, 1, also=(-1,), note="-1: no step budget"),
    Rule("trainer.log_every_n_steps", int, 1),
    Rule("trainer.check_val_every_n_epoch", int, 1),
    Rule("eval.false_alarm_rate", float, 0, 1, open_low=True, open_high=True),
    Rule("eval.n_heatmaps", int, 0),
    Rule("eval.kept_map_size", int, 1),
    Rule("eval.aupro_fpr_limit", float, 0, 1, open_low=True),
    Rule("feature_store.memory_gb", float, 0),
    Rule("backbone.feature_size", int, 1, note="null: the first chosen block's size"),
    Rule("seed", int, 0, 2**32 - 1),
)


def _leaves(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """(dotted key, unresolved node) of every leaf under `node`; lists count as leaves."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            yield from _leaves(node._get_node(key), f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


def _value(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    """(found, resolved value); a value that does not resolve is left to whoever reads it."""
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
    except OmegaConfBaseException:
        return False, None
    if isinstance(value, ListConfig | DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    return True, value


def _is_number(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if kind is int else isinstance(value, int | float)


def check_rule(rule: Rule, key: str, value: Any) -> str | None:
    """The problem with `key=value` under `rule`, or None. Null means the class default."""
    if value is None:
        return None
    values = value if isinstance(value, list) and key == "data.image_size" else [value]
    for v in values:
        if not _is_number(v, rule.kind) or not rule.accepts(v):
            return f"{key}={value!r}: {rule.allowed()}"
    return None


def missing_keys(cfg: DictConfig) -> list[str]:
    """Dotted keys still `???` (mandatory, never given)."""
    return [
        key
        for section in SECTIONS
        if section in cfg
        for key, node in _leaves(cfg._get_node(section), section)
        if node is not None and node._is_missing()
    ]


def category_choices(cfg: DictConfig) -> list[str]:
    """What data.category may be: the config's list, the synthetic set, or the folders under
    data.root that hold a train/ folder (the layout the data module reads)."""
    listed = OmegaConf.select(cfg, "data.categories", default=None, throw_on_missing=False)
    if listed:
        return [str(c) for c in listed]
    if str(OmegaConf.select(cfg, "data._target_", default="")).endswith("SyntheticDataModule"):
        from ad_lightning.data.synthetic import CATEGORIES

        return list(CATEGORIES)
    if OmegaConf.is_missing(cfg.data, "root") or not cfg.data.get("root"):
        return []
    root = Path(str(cfg.data.root)).expanduser()
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if (d / "train").is_dir())


def describe_missing(cfg: DictConfig, key: str) -> str:
    if key == "data.category":
        choices = category_choices(cfg)
        if choices:
            return f"data.category is not set: pass data.category=<one of {choices}>"
        where = (
            f"no sub-folder with a train/ folder under data.root={cfg.data.root}"
            if not OmegaConf.is_missing(cfg.data, "root") and cfg.data.get("root")
            else "set data.root first"
        )
        return f"data.category is not set: pass data.category=<a sub-folder of data.root> ({where})"
    if key == "data.root":
        return (
            "data.root is not set: pass data.root=/path/to/dataset "
            "(the folder holding one folder per category)"
        )
    return f"{key} is not set (???): pass {key}=<value>"


def _plain_type(annotation: Any) -> type | None:
    """int / float / bool from `int`, `float | None`, `Optional[bool]`; None for anything else."""
    if annotation in (int, float, bool):
        return annotation
    if typing.get_origin(annotation) in (UnionType, typing.Union):
        args = [a for a in typing.get_args(annotation) if a is not NoneType]
        if len(args) == 1 and args[0] in (int, float, bool):
            return args[0]
    return None


def annotated_types(target: str) -> dict[str, type]:
    """Parameters of `target.__init__` annotated as a plain int, float or bool, and those of
    the base classes its `**kwargs` reach (SyntheticDataModule passes them on to
    AnomalyDataModule)."""
    try:
        classes = get_class(target).__mro__
    except Exception:  # noqa: BLE001 - not importable: no type check
        return {}
    types: dict[str, type | None] = {}
    for cls in classes:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        try:
            hints = typing.get_type_hints(init)
            params = inspect.signature(init).parameters
        except Exception:  # noqa: BLE001 - unusual annotations: no type check
            break
        for name, param in params.items():
            if param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                types.setdefault(name, _plain_type(hints.get(name)))
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return {name: t for name, t in types.items() if t is not None}


def check_annotations(cfg: DictConfig, section: str) -> list[str]:
    """Values of `section` whose type contradicts its `_target_`'s __init__ annotations."""
    target = OmegaConf.select(cfg, f"{section}._target_", default=None)
    if not isinstance(target, str):
        return []
    bad = []
    for name, kind in annotated_types(target).items():
        found, value = _value(cfg, f"{section}.{name}")
        if not found or value is None:
            continue
        ok = isinstance(value, bool) if kind is bool else _is_number(value, kind)
        if not ok:
            word = {int: "an integer", float: "a number", bool: "true or false"}[kind]
            bad.append(f"{section}.{name}={value!r}: must be {word}")
    return bad


def problems(cfg: DictConfig) -> list[str]:
    """Every problem found, one line each, missing keys first."""
    missing = missing_keys(cfg)
    found = [describe_missing(cfg, key) for key in missing]
    checked = set(missing)
    keys = [
        key for section in SECTIONS if section in cfg for key, _ in _leaves(cfg[section], section)
    ]
    keys.append("seed")
    for key in keys:
        rule = next((r for r in RULES if fnmatchcase(key, r.pattern)), None)
        if rule is None or key in checked:
            continue
        ok, value = _value(cfg, key)
        problem = check_rule(rule, key, value) if ok else None
        if problem:
            found.append(problem)
            checked.add(key)
    for section in TYPED_SECTIONS:
        found += [p for p in check_annotations(cfg, section) if p.split("=", 1)[0] not in checked]
    for key in FLAGS:
        ok, value = _value(cfg, key)
        if ok and not isinstance(value, bool):
            found.append(f"{key}={value!r}: must be true or false")
    found += choice_problems(cfg) + ignored_keys(cfg)
    return found


def ignored_keys(cfg: DictConfig) -> list[str]:
    """Keys a new run would ignore beside another (a sweep over them would repeat one model):
    explicit AE widths fix every level, so width_ratio and levels have nothing to set. A
    resume or re-score runs the run's own config as it ran, and is not refused for it."""
    if cfg.get("test_only") or cfg.get("resume"):
        return []
    ok, widths = _value(cfg, "model.widths")
    if not ok or not widths:
        return []
    found = []
    _, ratio = _value(cfg, "model.width_ratio")
    if ratio is not None:
        found.append(
            f"model.width_ratio={ratio!r} is ignored beside model.widths={widths}: set "
            "model.width_ratio=null (or model.widths=null to size the AE by width_ratio)"
        )
    _, levels = _value(cfg, "model.levels")
    if levels is not None and levels != len(widths):
        found.append(
            f"model.levels={levels!r} differs from the {len(widths)} levels of "
            f"model.widths={widths}: set model.levels={len(widths)} (or model.widths=null)"
        )
    return found


def choice_problems(cfg: DictConfig) -> list[str]:
    """The evaluation's named choices, which are read only after the data are set up."""
    from ad_lightning.metrics.evaluation import PROTOCOLS, THRESHOLD_RULES

    found = []
    for key, allowed in (("protocol", PROTOCOLS), ("eval.threshold", THRESHOLD_RULES)):
        ok, value = _value(cfg, key)
        if ok and value not in allowed:
            found.append(f"{key}={value!r}: must be one of {', '.join(allowed)}")
    return found


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError listing every missing or out-of-range key of the composed config."""
    found = problems(cfg)
    if found:
        raise ConfigError("invalid config:\n" + "\n".join(f"  - {p}" for p in found))
