"""The trainer: config, the run recipe, the one loop, checkpoints, distributed set-up.

The names load lazily (PEP 562): ``emanorm.train.config`` (the schema) imports no torch, and
neither does ``import emanorm.train`` until a torch name such as ``train`` is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emanorm._lazy import lazy_package

_WHERE = {
    **dict.fromkeys(
        ("DEFAULTS", "METHODS", "NORMS", "SEMI_SUPERVISED", "resolve_config"), "emanorm.train.config"
    ),
    **dict.fromkeys(("Monitor", "NonFiniteLossError", "train", "train_step"), "emanorm.train.loop"),
    **dict.fromkeys(("Run", "build_run"), "emanorm.train.recipe"),
    "FiniteWatch": "emanorm.train.finite",
    **dict.fromkeys(
        ("initialise_from", "load_backbone", "load_method", "make_method"), "emanorm.train.restore"
    ),
}
lazy_package(__name__, _WHERE)
__all__ = [
    "DEFAULTS",
    "METHODS",
    "NORMS",
    "SEMI_SUPERVISED",
    "FiniteWatch",
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

if TYPE_CHECKING:  # what type checkers and IDEs see
    from emanorm.train.config import DEFAULTS, METHODS, NORMS, SEMI_SUPERVISED, resolve_config
    from emanorm.train.finite import FiniteWatch
    from emanorm.train.loop import Monitor, NonFiniteLossError, train, train_step
    from emanorm.train.recipe import Run, build_run
    from emanorm.train.restore import initialise_from, load_backbone, load_method, make_method
