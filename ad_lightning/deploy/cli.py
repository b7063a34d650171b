"""`key=value` command lines for predict, export and bench, checked against a dataclass.

The same override syntax as run.py (OmegaConf dot-list), without a Hydra job: these commands
write only where `out=` says. An unknown or missing key stops with the list of valid keys.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import fields
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, ValidationError

T = TypeVar("T")


def parse_args(schema: type[T], argv: list[str] | None = None, command: str = "") -> T:
    """Overrides `key=value` -> an instance of the dataclass `schema`."""
    argv = sys.argv[1:] if argv is None else argv
    keys = ", ".join(f.name for f in fields(schema))  # type: ignore[arg-type]
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: python -m {command} key=value ...\nkeys: {keys}\n{schema.__doc__ or ''}")
        raise SystemExit(0)
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise SystemExit(f"{command}: arguments are key=value; got {bad}. Keys: {keys}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(argv))
        config: Any = OmegaConf.to_object(merged)
    except ConfigKeyError as err:
        raise SystemExit(f"{command}: unknown key ({err.key}); valid keys: {keys}") from None
    except MissingMandatoryValue as err:
        raise SystemExit(f"{command}: {err.full_key}= is required; keys: {keys}") from None
    except ValidationError as err:
        raise SystemExit(f"{command}: {err.full_key}: {err.msg}") from None
    return config


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    for noisy in ("timm", "pytorch_lightning", "lightning"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
