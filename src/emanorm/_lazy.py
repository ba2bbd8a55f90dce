"""PEP 562 lazy attributes for the package ``__init__`` modules.

``import emanorm`` (and ``emanorm.train``) must not import torch: the ``emanorm`` command answers
``--version``, ``--help`` and config errors before torch loads. A package names its public
attributes and the module each lives in; the module is imported when the name is first used.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any


def lazy_attributes(
    package: str, namespace: dict[str, Any], where: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose attribute ``name`` lives in module
    ``where[name]``; a loaded attribute is cached in ``namespace`` (the package's globals)."""

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            # a submodule not imported yet (``emanorm.train.loop`` after ``import emanorm.train``),
            # as an eager package ``__init__`` would have made it an attribute
            if not name.startswith("__") and importlib.util.find_spec(f"{package}.{name}") is not None:
                return importlib.import_module(f"{package}.{name}")
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *where})

    return __getattr__, __dir__
