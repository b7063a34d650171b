"""The methods, derived from the model configs: no list of methods is kept anywhere else.

A method is a config in `conf/model/` (its name is the file's stem, what `model=` takes). Its
facts come from the config, composed with Hydra so that `defaults:` inheritance holds
(`ae_ssim` from `ae`), and from the class the config's `_target_` names: the capability
flags declared on `AnomalyModule`, the `family` its family base declares (models/families/)
and the score names it declares. Adding a method is one model file and one config; the shared
tests (tests/test_methods.py), the README's methods table and the bench read them from here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from ad_lightning.models.base import AnomalyModule

#: the repository's config folder
CONF = Path(__file__).resolve().parents[2] / "conf"


@dataclass(frozen=True)
class MethodInfo:
    """What the registry knows about one method (one config of conf/model/)."""

    name: str
    target: type[AnomalyModule]
    family: str
    trains_by_gradient: bool
    score_needs_grad: bool
    #: why the scoring path cannot be an ONNX graph; None: it can
    export_blocker: str | None
    reads_stored_features: bool
    #: the config's `model.score` first, then the class's other score names
    scores: tuple[str, ...]
    #: the config's first comment line
    description: str
    config_path: Path

    @property
    def exportable(self) -> bool:
        return self.export_blocker is None

    @property
    def primary_score(self) -> str:
        return self.scores[0]


def list_methods(conf: Path | str | None = None) -> list[str]:
    """Names of the methods (what `model=` takes), sorted."""
    return sorted(p.stem for p in (Path(conf or CONF) / "model").glob("*.yaml"))


def method_info(name: str, conf: Path | str | None = None) -> MethodInfo:
    """The facts of one method; a KeyError naming the known methods for an unknown name."""
    return _info(name, str(Path(conf or CONF).resolve()))


def all_methods(conf: Path | str | None = None) -> list[MethodInfo]:
    return [method_info(name, conf) for name in list_methods(conf)]


@functools.cache
def _info(name: str, conf: str) -> MethodInfo:
    path = Path(conf) / "model" / f"{name}.yaml"
    if not path.is_file():
        raise KeyError(f"no method {name!r}: the methods are {list_methods(conf)}")
    model = _compose_model(conf, name)
    target = hydra.utils.get_class(model["_target_"])
    if not issubclass(target, AnomalyModule):
        raise TypeError(f"{path}: {model['_target_']} is not an AnomalyModule")
    return MethodInfo(
        name=name,
        target=target,
        family=_declared(target, "family", "subclass a family base of models/families/"),
        trains_by_gradient=target.trains_by_gradient,
        score_needs_grad=target.score_needs_grad,
        export_blocker=target.export_blocker,
        reads_stored_features=target.reads_stored_features,
        scores=_scores(target, model.get("score"), path),
        description=_first_comment(path),
        config_path=path,
    )


def _compose_model(conf: str, name: str) -> DictConfig:
    """The `model` node of `config` with model=name (read, not resolved: nothing else needed)."""
    overrides = [f"model={name}"]
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: its search path is conf/
        return compose("config", overrides=overrides).model
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        return compose("config", overrides=overrides).model


def _declared(target: type, attribute: str, advice: str) -> Any:
    value = getattr(target, attribute, None)
    if not value:
        raise TypeError(f"{target.__name__} declares no `{attribute}`: {advice}")
    return value


def _scores(target: type, primary: str | None, path: Path) -> tuple[str, ...]:
    names = tuple(_declared(target, "score_names", "list the names its score() returns"))
    primary = primary or names[0]
    if primary not in names:
        raise ValueError(f"{path}: model.score={primary!r} is not one of {list(names)}")
    return (primary, *(n for n in names if n != primary))


def _first_comment(path: Path) -> str:
    """The config's first comment line that is not Hydra's `@package` header."""
    for line in path.read_text().splitlines():
        text = line.strip()
        if not text.startswith("#"):
            break
        text = text.lstrip("#").strip()
        if text and not text.startswith("@package"):
            return text
    raise ValueError(f"{path}: begin it with a comment line that says what the method is")


TABLE_HEADER = (
    "| `model=` | method | scores (first = primary, `model.score=` picks another) "
    "| family | trains by | ONNX export |\n|---|---|---|---|---|---|"
)


def table_row(info: MethodInfo) -> str:
    scores = ", ".join(f"`{s}`" for s in info.scores)
    trains = "gradient" if info.trains_by_gradient else "statistics (one pass)"
    export = "yes" if info.exportable else "no"
    return (
        f"| `{info.name}` | {info.description} | {scores} | {info.family} | {trains} | {export} |"
    )


def methods_table(conf: Path | str | None = None) -> str:
    """README.md's methods table (markdown), one row per method; tests/test_methods.py checks
    that the README holds exactly this (`python -m ad_lightning.models.registry` prints it)."""
    return "\n".join([TABLE_HEADER, *(table_row(info) for info in all_methods(conf))])


if __name__ == "__main__":
    print(methods_table())
