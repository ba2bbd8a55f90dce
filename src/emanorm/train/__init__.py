"""The trainer: config, the run recipe, the one loop, checkpoints, distributed set-up."""

from emanorm.train.config import DEFAULTS, METHODS, NORMS, SEMI_SUPERVISED, resolve_config
from emanorm.train.loop import Monitor, NonFiniteLossError, train, train_step
from emanorm.train.recipe import Run, build_run, initialise_from, load_backbone, load_method, make_method

__all__ = [
    "DEFAULTS",
    "METHODS",
    "NORMS",
    "SEMI_SUPERVISED",
    "Monitor",
    "NonFiniteLossError",
    "Run",
    "build_run",
    "initialise_from",
    "load_backbone",
    "load_method",
    "make_method",
    "resolve_config",
    "train",
    "train_step",
]
