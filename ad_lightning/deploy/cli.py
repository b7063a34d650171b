"""Command lines of predict, export and bench: Hydra's override syntax, as run.py's.

Each command's keys are a dataclass, registered in Hydra's ConfigStore and composed with the
command line's overrides (`key=value`, lists as `key=[a,b]`; quote a value holding brackets,
commas, `=`, `~` or non-ASCII letters: `'input="line3/00[01].png"'`). Composed, not run as a
Hydra job: these commands write only where `out=` says, with no output folder of Hydra's.
`--help` lists the keys with their defaults; an unknown or missing key stops with the list
of valid keys.
"""

from __future__ import annotations

import inspect
import logging
import re
import sys
from dataclasses import MISSING, fields
from typing import Any, TypeVar

from hydra import compose, initialize
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue, ValidationError

T = TypeVar("T")


def key_comments(schema: type) -> dict[str, str]:
    """Each field's trailing `# comment` in the dataclass's source, as its help text."""
    try:
        source = inspect.getsource(schema)
    except (OSError, TypeError):
        return {}
    found = re.findall(r"^\s+(\w+): [^#\n]*#\s*(.+)$", source, flags=re.MULTILINE)
    return dict(found)


def spelled(value: Any) -> str:
    """A default as an override writes it: null, true, [a,b]."""
    if isinstance(value, list):
        return f"[{','.join(spelled(v) for v in value)}]"
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def usage(schema: type, command: str) -> str:
    """The `--help` text: the command, its purpose and every key with its default."""
    comments = key_comments(schema)
    lines = [
        f"usage: python -m {command} key=value ...  (Hydra override syntax, as run.py)",
        inspect.cleandoc(schema.__doc__ or ""),
        "keys (??? = required):",
    ]
    for f in fields(schema):  # type: ignore[arg-type]
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = "???"
        text = f"  {f.name}={spelled(default)}"
        lines.append(f"{text:<36} {comments.get(f.name, '')}".rstrip())
    return "\n".join(lines)


def _compose(name: str, argv: list[str]) -> Any:
    if GlobalHydra.instance().is_initialized():  # inside another Hydra app: its loader serves
        return compose(name, overrides=argv)
    with initialize(version_base="1.3", config_path=None):
        return compose(name, overrides=argv)


def parse_args(schema: type[T], argv: list[str] | None = None, command: str = "") -> T:
    """Hydra overrides -> an instance of the dataclass `schema`."""
    argv = sys.argv[1:] if argv is None else argv
    names = [f.name for f in fields(schema)]  # type: ignore[arg-type]
    keys = ", ".join(names)
    if any(a in ("-h", "--help") for a in argv):
        print(usage(schema, command))
        raise SystemExit(0)
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise SystemExit(f"{command}: arguments are key=value; got {bad}. Keys: {keys}")
    parser = OverridesParser.create()
    overrides = []
    for arg in argv:
        try:
            overrides += parser.parse_overrides([arg])
        except HydraException as err:
            raise SystemExit(
                f"{command}: cannot read {arg!r}: {str(err).splitlines()[0]}. Hydra's override "
                "syntax (as run.py): quote a value holding [ ] ( ) , = ~ & # or "
                "non-ASCII letters, e.g. 'input=\"line3/00[01].png\"' or 'model=\"~/runs/a\"'"
            ) from None
    unknown = [o.key_or_group for o in overrides if o.key_or_group.split(".")[0] not in names]
    if unknown:
        raise SystemExit(f"{command}: unknown key ({', '.join(unknown)}); valid keys: {keys}")
    ConfigStore.instance().store(name=schema.__name__, node=schema)
    try:
        config: Any = OmegaConf.to_object(_compose(schema.__name__, argv))
    except MissingMandatoryValue as err:
        raise SystemExit(f"{command}: {err.full_key}= is required; keys: {keys}") from None
    except HydraException as err:
        cause = err.__cause__
        if isinstance(cause, ValidationError):
            raise SystemExit(f"{command}: {cause.full_key}: {cause.msg.splitlines()[0]}") from None
        raise SystemExit(f"{command}: {err}; keys: {keys}") from None
    return config


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    for noisy in ("timm", "pytorch_lightning", "lightning"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
