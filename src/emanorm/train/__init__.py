"""The trainer: config, the one loop, checkpoints, distributed set-up."""

from emanorm.train.config import DEFAULTS, METHODS, NORMS, resolve_config
from emanorm.train.loop import NonFiniteLossError, train, train_step

__all__ = ["DEFAULTS", "METHODS", "NORMS", "NonFiniteLossError", "resolve_config", "train", "train_step"]
