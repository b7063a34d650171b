"""OmegaConf resolvers used by conf/ (registered once, at package import)."""

import os

from omegaconf import OmegaConf


def wandb_offline() -> bool:
    """W&B runs offline unless an API key is present, so it works with no network."""
    return not os.environ.get("WANDB_API_KEY")


def _tasks_per_node(devices: object) -> int:
    """SLURM tasks per node for Lightning: one per device. Resolved when the launcher is built,
    so a count only the node knows (-1, "auto") stops the sweep before anything is queued."""
    from ad_lightning.launcher_env import device_count

    count = device_count(devices)
    if count is None:
        raise ValueError(
            f"trainer.devices={devices}: a SLURM job needs the device count as a number "
            "(Lightning's SLURM mode needs tasks_per_node == trainer.devices), e.g. "
            "trainer.devices=8"
        )
    return count


def _gpus_per_node(devices: object, accelerator: str) -> int:
    """GPUs to request per node: the trainer's devices. A CPU trainer is refused: the default
    trainer is cpu, so it is nearly always a forgotten trainer=gpu that would queue GPU nodes
    to train on their CPUs; CPU nodes are asked for with hydra.launcher.gpus_per_node=0."""
    if accelerator in ("gpu", "cuda", "auto"):
        return _tasks_per_node(devices)
    raise ValueError(
        f"hydra/launcher=slurm with trainer.accelerator={accelerator}: add trainer=gpu (or "
        "trainer=ddp trainer.devices=N) to train on the nodes' GPUs, or "
        "hydra.launcher.gpus_per_node=0 to run on CPU nodes on purpose"
    )


def _input_normalization(backbone_name: str) -> str:
    """The data.normalize a timm backbone's pretrained weights expect (`half` for Xception,
    `imagenet` for most, and for a name timm does not know)."""
    import timm

    from ad_lightning.backbones.features import normalize_for

    cfg = timm.models.get_pretrained_cfg(backbone_name)
    return (normalize_for((cfg.mean, cfg.std)) if cfg else None) or "imagenet"


def register_resolvers() -> None:
    resolvers = {
        "ad.input_normalization": _input_normalization,
        "ad.wandb_offline": wandb_offline,
        "ad.tasks_per_node": _tasks_per_node,
        "ad.gpus_per_node": _gpus_per_node,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
