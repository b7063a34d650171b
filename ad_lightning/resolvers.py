"""OmegaConf resolvers used by conf/ (registered once, at package import)."""

import os

from omegaconf import OmegaConf


def _wandb_offline() -> bool:
    """W&B runs offline unless an API key is present, so it works with no network."""
    return not os.environ.get("WANDB_API_KEY")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("ad.wandb_offline"):
        OmegaConf.register_new_resolver("ad.wandb_offline", _wandb_offline)
