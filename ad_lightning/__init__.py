"""ad_lightning: industrial visual anomaly detection experiments on Lightning + Hydra."""

from ad_lightning.resolvers import register_resolvers

__version__ = "0.1.0"

register_resolvers()
