"""What a DDP run needs of its config, decided before anything is built.

Two rules: a sweep (`-m`) must not let Lightning start the ranks, since its subprocess launcher
re-runs the whole command line in each rank, so every rank would start a sweep of its own; and a
method whose training step leaves trainable parameters out of a backward pass (the GAN family)
needs DDP's unused-parameter search, or the reducer stops at the next step.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from lightning_fabric.plugins.environments import (
    LSFEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)

#: strategies whose ranks Lightning starts in-process (multiprocessing), not by re-running argv
_IN_PROCESS_STARTS = ("spawn", "fork", "notebook")


def ranks_started_outside() -> bool:
    """Whether a launcher or scheduler starts every rank itself, decided as Lightning decides
    it: srun (but not in an interactive SLURM shell, a job named `bash` or `interactive`, where
    Lightning starts the ranks by re-running the command), torchrun, LSF, or a rank of ours."""
    slurm = "SLURM_NTASKS" in os.environ and SLURMEnvironment.job_name() not in (
        "bash",
        "interactive",
    )
    return (
        slurm
        or "LOCAL_RANK" in os.environ
        or TorchElasticEnvironment.detect()
        or LSFEnvironment.detect()
    )


def apply_ddp_rules(cfg: DictConfig) -> None:
    """Refuse a sweep that Lightning would multiply, and ask DDP to look for unused parameters
    where the method's training needs it (`trainer.strategy` changed in `cfg`, so results.json
    records the strategy the run used)."""
    refuse_sweep_with_script_launcher(cfg)
    request_unused_parameter_search(cfg)


def device_count(trainer: Any) -> int:
    """How many devices per node `trainer.devices` asks for (-1 / auto: all visible GPUs)."""
    devices = trainer.get("devices", 1)
    accelerator = str(trainer.get("accelerator", "auto"))
    if isinstance(devices, str) and devices not in ("auto", "-1"):
        parts = [p for p in devices.split(",") if p.strip()]
        return len(parts) if "," in devices else int(devices)
    if devices in (-1, "-1", "auto"):
        if accelerator == "cpu" or not torch.cuda.is_available():
            return 1
        return torch.cuda.device_count()
    if isinstance(devices, int):
        return devices
    return len(list(devices))


def launches_ranks_by_script(trainer: Any) -> bool:
    """True when Lightning itself would start the other ranks by re-running this command."""
    processes = device_count(trainer) * int(trainer.get("num_nodes", 1) or 1)
    if processes <= 1 or ranks_started_outside():
        return False
    strategy = trainer.get("strategy", "auto")
    if isinstance(strategy, str):
        return not any(word in strategy for word in _IN_PROCESS_STARTS)
    return str(strategy.get("start_method", "popen")) == "popen"


def refuse_sweep_with_script_launcher(cfg: DictConfig) -> None:
    if not (HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN"):
        return
    if not launches_ranks_by_script(cfg.trainer):
        return
    raise ValueError(
        f"-m (a sweep) with trainer.strategy={cfg.trainer.get('strategy')} and "
        f"trainer.devices={cfg.trainer.get('devices')}: Lightning starts the other ranks by "
        "re-running this command line, so each rank would start a sweep of its own. Sweep "
        "through a launcher that gives every job its own process(es): hydra/launcher=slurm "
        "(submitit; one job per launcher task, tasks_per_node = trainer.devices) for DDP jobs, "
        "or hydra/launcher=joblib with trainer.devices=1 (one device per job) on one machine; "
        "or run each configuration without -m"
    )


def request_unused_parameter_search(cfg: DictConfig) -> None:
    target = cfg.get("model", {}).get("_target_")
    if not target or not getattr(
        hydra.utils.get_class(target), "ddp_find_unused_parameters", False
    ):
        return
    strategy = cfg.trainer.get("strategy", "auto")
    with open_dict(cfg):
        if isinstance(strategy, str) and strategy.startswith("ddp"):
            if "find_unused_parameters" in strategy:
                if strategy.endswith("_false"):
                    log.warning("trainer.strategy=%s: this method's steps need _true", strategy)
                return
            cfg.trainer.strategy = f"{strategy}_find_unused_parameters_true"
        elif isinstance(strategy, DictConfig) and "DDPStrategy" in str(strategy.get("_target_")):
            strategy.find_unused_parameters = True
        else:
            return
    log.info("trainer.strategy: %s (unused-parameter search)", cfg.trainer.strategy)
