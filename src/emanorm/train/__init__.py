"""The trainer: config, the one loop, checkpoints, distributed set-up."""

from emanorm.train.config import DEFAULTS, METHODS, NORMS, resolve_config
from emanorm.train.loop import train

__all__ = ["DEFAULTS", "METHODS", "NORMS", "resolve_config", "train"]
