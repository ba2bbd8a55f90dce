"""The machinery of a typed config schema: a field's bounds, its command-line flag, and the check
of one value against its field. The schema itself (``TrainConfig``) is in
:mod:`emanorm.train.config`; nothing here knows its keys. Stdlib only (no torch).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from emanorm.errors import UserError


@dataclass(frozen=True)
class Bounds:
    """A numeric range; ``None`` is unbounded. ``open_low``: the low end itself is excluded."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False

    def admits(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.open_low else value >= self.low)
        return above and (self.high is None or value <= self.high)

    def describe(self, kind: type) -> str:
        if self == POSITIVE:
            return "positive" if kind is int else "a positive number"
        if self.high is None:
            return f"{'an integer' if kind is int else 'a number'} >= {self.low:g}"
        return f"{'(' if self.open_low else '['}{self.low:g}, {self.high:g}]"


POSITIVE = Bounds(0, open_low=True)
NON_NEGATIVE = Bounds(0)
UNIT = Bounds(0, 1)
FRACTION = Bounds(0, 1, open_low=True)


@dataclass(frozen=True)
class Flag:
    """How a key appears as an ``emanorm train`` flag.

    Attributes:
        group: the ``--help`` section.
        name: the flag (default: ``--`` and the key with dashes).
        exclusive: flags with the same name here exclude each other (a mutually exclusive group).
        metavar: argparse's metavar.
        show_choices: list the allowed values in the help text.
    """

    group: str
    name: str | None = None
    exclusive: str | None = None
    metavar: str | None = None
    show_choices: bool = True


def option(
    default: Any,
    help: str,
    *,
    choices: tuple[Any, ...] | None = None,
    bounds: Bounds | None = None,
    flag: Flag | None = None,
    affects_weights: bool = True,
) -> Any:
    """A :class:`TrainConfig` field: its default and what the schema knows about it."""
    metadata = {
        "help": help, "choices": choices, "bounds": bounds, "flag": flag, "affects_weights": affects_weights,
    }
    if isinstance(default, list | dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def suggestion(value: Any, allowed: Any) -> str:
    """`` (did you mean 'eman'?)`` for a near miss (case and typos), else nothing."""
    if not isinstance(value, str):
        return ""
    names = [str(a) for a in allowed]
    lowered = {name.lower(): name for name in names}
    if value.lower() in lowered:
        return f" (did you mean {lowered[value.lower()]!r}?)"
    close = difflib.get_close_matches(value, names, n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""



@functools.cache
def field_types(schema: type) -> dict[str, tuple[type, ...]]:
    """Field -> the plain types its annotation admits (``type(None)`` where it may be null)."""
    hints = typing.get_type_hints(schema)
    out = {}
    for key, hint in hints.items():
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        out[key] = tuple(typing.get_origin(a) or a for a in args)
    return out


def number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_type(key: str, value: Any, admitted: tuple[type, ...], bounds: Bounds | None) -> Any:
    """``value`` as the annotation's type (an integral float for an int, an int for a float), or
    a UserError in the words the bounds use."""
    if bool in admitted:
        if not isinstance(value, bool):
            raise UserError(f"{key} must be true or false, got {value!r}")
        return value
    if int in admitted:
        if not (number(value) and math.isfinite(value) and int(value) == value):
            kind = "a positive int" if bounds == POSITIVE else f"an integer{_bounds_text(bounds, int)}"
            raise UserError(f"{key} must be {kind}, got {value!r}")
        return int(value)
    if float in admitted:
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, float) and not math.isfinite(value):  # nan / inf fail at step 0 otherwise
            raise UserError(f"{key} must be a finite number, got {value!r}")
        if not number(value):
            kind = "a positive number" if bounds == POSITIVE else f"a number{_bounds_text(bounds, float)}"
            raise UserError(f"{key} must be {kind}, got {value!r}")
        return float(value)
    if str in admitted and not isinstance(value, str):
        raise UserError(f"{key} must be a string, got {value!r}")
    if dict in admitted and not isinstance(value, dict):
        raise UserError(f"{key} must be a mapping (e.g. {{name: value}}), got {value!r}")
    return value


def _bounds_text(bounds: Bounds | None, kind: type) -> str:
    if bounds is None:
        return ""
    if bounds.high is None:
        return f" >= {bounds.low:g}" if not bounds.open_low else f" > {bounds.low:g}"
    return f" in {bounds.describe(kind)}"


def check_field(key: str, value: Any, schema_field: dataclasses.Field, admitted: tuple[type, ...]) -> Any:
    """One value against its schema field (``admitted``: its annotation's types, from
    :func:`field_types`): choices, null, type, bounds. Returns the value as typed; a UserError
    names the value and what is allowed."""
    meta = schema_field.metadata
    choices = meta["choices"]
    if choices is not None:
        # 1 == True in Python: a choice matches only a value of its own kind
        if not any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in choices):
            shown = ", ".join(str(c) for c in choices)
            raise UserError(f"unknown {key} {value!r}{suggestion(value, choices)}; allowed: {shown}")
        return value
    if value is None:
        if type(None) in admitted:
            return None
        raise UserError(f"{key} must be set (it cannot be null)")
    typed = _check_type(key, value, admitted, meta["bounds"])
    bounds: Bounds | None = meta["bounds"]
    if bounds is not None and not bounds.admits(typed):
        text = bounds.describe(int if int in admitted else float)
        verb = "lie in" if text.startswith(("[", "(")) else "be"
        raise UserError(f"{key} must {verb} {text}, got {value!r}")
    return typed
