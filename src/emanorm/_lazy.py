"""Lazy public names for the package ``__init__`` modules (PEP 562 and a module class).

``import emanorm`` (and ``emanorm.train``, ``emanorm.evaluation``) must not import torch: the
``emanorm`` command answers ``--version``, ``--help`` and config errors before torch loads. A
package names its public attributes and the module each lives in; that module is imported when
the name is first used, and the name then behaves as an eager ``from ... import`` made it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any


class LazyPackage(types.ModuleType):
    """A package whose public names load on first use (``_lazy_names``: name -> module)."""

    _lazy_names: dict[str, str]

    def __getattr__(self, name: str) -> Any:
        where = self.__dict__.get("_lazy_names", {})
        module = where.get(name)
        if module is None:
            # a submodule not imported yet (``emanorm.train.loop`` after ``import emanorm.train``),
            # as an eager package ``__init__`` would have made it an attribute
            if not name.startswith("__") and importlib.util.find_spec(f"{self.__name__}.{name}") is not None:
                return importlib.import_module(f"{self.__name__}.{name}")
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        super().__setattr__(name, value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        # Loading a submodule makes it an attribute of its package; where a public name is spelled
        # like its submodule (emanorm.evaluation.finetune, the function, in finetune.py), the public
        # name wins, as it did with eager imports.
        where = self.__dict__.get("_lazy_names", {})
        shadowed = (
            isinstance(value, types.ModuleType)
            and value.__name__ == f"{self.__name__}.{name}"
            and where.get(name) == value.__name__
        )
        if not shadowed:
            super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted({*self.__dict__, *self.__dict__.get("_lazy_names", {})})


def lazy_package(package: str, names: dict[str, str]) -> None:
    """Make the (already executing) package ``package`` load ``names[name]`` on first use."""
    module = sys.modules[package]
    module.__class__ = LazyPackage
    module._lazy_names = dict(names)
