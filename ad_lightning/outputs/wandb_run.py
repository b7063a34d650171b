"""What a run tells W&B beyond Lightning's metric stream, so that a dashboard can group, filter
and pivot a sweep by what was swept.

At start (`init_args`): the whole resolved config, flat and dotted (`backbone.name`,
`backbone.blocks`, `data.category`, `seed`, `protocol`, `choices.model`, ...), since W&B groups
and filters by config keys and the model's own hyperparameters (all Lightning logs) do not say
which backbone, blocks or data a run used; a readable name, `job_type` = the model choice, tags.
At the end (`log_outcome`): the test metrics and the best validation loss in the summary (the
default summary keeps the last value logged, not the one the scored checkpoint was chosen by),
the per-image scores as a table and, when asked, model.pt as an artifact.
"""

from __future__ import annotations

import logging
import secrets
import string
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import WandbLogger

from ad_lightning.metrics.evaluation import log_values
from ad_lightning.results import RunResults, TestResults

log = logging.getLogger(__name__)

#: keys of conf/logger/wandb.yaml that are ours, not WandbLogger's or wandb.init's
OWN_KEYS = ("log_model_file",)


def is_wandb(conf: dict[str, Any]) -> bool:
    return "WandbLogger" in str(conf.get("_target_", ""))


def flat_config(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"a.b.c": value}; lists stay values (`backbone.blocks: [1, 2, 3]`)."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat |= flat_config(value, f"{prefix}.{key}" if prefix else str(key))
    return flat


def uses_backbone(config: dict[str, Any]) -> bool:
    """Every config holds a `backbone` group; only a model that takes one uses it."""
    return isinstance((config.get("model") or {}).get("backbone"), dict)


def model_choice(config: dict[str, Any], choices: dict[str, str]) -> str:
    """The model config chosen (`ae_ssim`), else the class name (compose API without choices)."""
    if choices.get("model"):
        return choices["model"]
    return str((config.get("model") or {}).get("_target_", "model")).rsplit(".", 1)[-1]


def blocks_label(blocks: Any) -> str:
    """[1, 2, 3] -> "123" (stage numbers are single digits); "1_10" if one is not."""
    items = [str(b) for b in (blocks if isinstance(blocks, (list, tuple)) else [blocks])]
    return ("" if all(len(b) == 1 for b in items) else "_").join(items)


def run_name(config: dict[str, Any], choices: dict[str, str], job_num: int | None) -> str:
    """`skip_dfr-efficientnet_lite0-b123-object-s0`, with `-j<N>` for a multirun job so that
    jobs differing in an unnamed key (lr, ...) stay apart and point at their folder."""
    parts = [model_choice(config, choices)]
    if uses_backbone(config):
        backbone = config["backbone"]
        parts += [str(backbone.get("name")), "b" + blocks_label(backbone.get("blocks"))]
    category = (config.get("data") or {}).get("category")
    parts += [str(category)] if category is not None else []
    parts.append(f"s{config.get('seed')}")
    if job_num is not None:
        parts.append(f"j{job_num}")
    return "-".join(parts)


def run_tags(config: dict[str, Any], choices: dict[str, str], extra: list[str]) -> list[str]:
    """Model, backbone, blocks, data set, category, protocol, then the config's own tags."""
    data = config.get("data") or {}
    tags = [model_choice(config, choices)]
    if uses_backbone(config):
        backbone = config["backbone"]
        tags += [str(backbone.get("name")), f"blocks={blocks_label(backbone.get('blocks'))}"]
    tags += [str(data[k]) for k in ("name", "category") if data.get(k) is not None]
    tags.append(str(config.get("protocol")))
    return list(dict.fromkeys(t[:64] for t in [*tags, *map(str, extra)]))  # W&B: <= 64 chars


def init_args(
    conf: dict[str, Any],
    config: dict[str, Any],
    choices: dict[str, str],
    sweep_group: str | None,
    job_num: int | None,
) -> dict[str, Any]:
    """The WandbLogger arguments of logger config `conf` for a run of resolved `config`: what
    the config leaves null is filled in (group: the sweep folder's name in a multirun); the
    W&B config itself is `run_config`'s."""
    args = {k: v for k, v in conf.items() if k not in OWN_KEYS}
    args["group"] = args.get("group") or sweep_group
    args["job_type"] = args.get("job_type") or model_choice(config, choices)
    args["name"] = args.get("name") or run_name(config, choices, job_num)
    args["tags"] = run_tags(config, choices, list(args.get("tags") or []))
    return args


def new_id() -> str:
    """A fresh W&B run id, chosen before the run starts so results.json can record it (W&B's
    own form: 8 lowercase letters and digits; its generator is not public API)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def logged_as(config: dict[str, Any] | None, logger: str) -> dict[str, Any] | None:
    """The W&B run (id, group, name, job type) logger `logger` of a run with resolved `config`
    logged under; None without an id (a run recorded before the id was kept)."""
    conf = ((config or {}).get("logger") or {}).get(logger)
    if not (isinstance(conf, dict) and isinstance(conf.get("id"), str) and conf["id"]):
        return None
    return {key: conf.get(key) for key in ("id", "group", "name", "job_type")}


def run_config(config: dict[str, Any], choices: dict[str, str]) -> dict[str, Any]:
    """The W&B config: every key of the resolved config, dotted, and `choices.<group>`."""
    return flat_config(config) | {f"choices.{k}": v for k, v in choices.items()}


def summary_values(results: RunResults, monitor: str | None) -> dict[str, Any]:
    """Test metrics under their logged keys (test/image_auroc, ...), the scored checkpoint's
    monitored value (its best, e.g. `val/loss`, and `val/loss_best`) and the epochs run."""
    values: dict[str, Any] = {"primary_score": results.get("primary_score")}
    checkpoint = results.get("checkpoint")
    best = checkpoint.get("best_score") if checkpoint else None
    if monitor and isinstance(best, (int, float)):
        values[monitor] = values[f"{monitor}_best"] = float(best)
    if checkpoint and isinstance(checkpoint.get("epochs"), int):
        values["epochs"] = checkpoint.get("epochs")
    return {k: v for k, v in values.items() if v is not None}


def log_outcome(
    loggers: list[Any],
    results: RunResults,
    test_results: TestResults | None,
    monitor: str | None,
    model_file: Path | None,
    log_model_file: bool,
) -> None:
    """Summary, per-image score table and (if `log_model_file`) model.pt, into every W&B
    logger; call on rank 0 after the test and the model file are written."""
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        run = logger.experiment
        summary = summary_values(results, monitor)
        if test_results is not None:
            summary |= log_values(test_results)
            if test_results.records:
                columns = list(test_results.records[0])
                rows = [[r.get(c) for c in columns] for r in test_results.records]
                logger.log_table("test/scores", columns=columns, data=rows)
        run.summary.update(summary)
        if log_model_file and model_file is not None and model_file.is_file():
            log_model(run, model_file, results)


def log_model(run: Any, path: Path, results: RunResults) -> None:
    """model.pt as a `model` artifact, referenced in place ("immutable": no staging copy; a
    finished run's folder is never written over), uploaded when the run is synced."""
    import wandb

    artifact = wandb.Artifact(
        f"model-{run.id}",
        type="model",
        metadata={
            "run_dir": results.run_dir,
            "choices": results.choices,
            "primary_score": results.get("primary_score"),
            "metrics": results.get("metrics"),
        },
    )
    artifact.add_file(str(path), policy="immutable")
    run.log_artifact(artifact, aliases=["latest"])
    log.info("model file logged to W&B as artifact %s", artifact.name)
