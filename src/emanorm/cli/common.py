"""What every ``emanorm`` subcommand's parser shares: one-line usage errors and argument types."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from emanorm.errors import UserError
from emanorm.train.presets import parse_key_value


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage is one --help away)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> ``(key, YAML value)``; dashes in KEY become underscores
    (:func:`emanorm.train.presets.parse_key_value` as an argparse type)."""
    try:
        return parse_key_value(text)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def fraction(text: str) -> float:
    """``0.1`` or ``10%`` -> 0.1, in (0, 1]."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction like 0.1 or 10%, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"the fraction must lie in (0, 1] (or (0%, 100%]), got {text!r}")
    return value


def add_command(subparsers: Any, name: str, help: str, description: str) -> argparse.ArgumentParser:
    """A subcommand whose description keeps its own line breaks (the examples in it)."""
    return subparsers.add_parser(
        name, help=help, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_repeatable(
    group: Any, flag: str, metavar: str, help: str, *, type: Callable[[str], Any] | None = None
) -> None:
    """A flag that may be given several times; the values (each converted by ``type``, if given)
    are collected in a list, empty when the flag is left out."""
    group.add_argument(flag, action="append", default=[], type=type, metavar=metavar, help=help)


def add_verbose(group: Any, *, default: Any = False) -> None:
    """``-v/--verbose``, before the subcommand or after it. A subcommand passes
    ``default=argparse.SUPPRESS``, so that leaving it out there keeps what the top level parsed."""
    group.add_argument(
        "-v", "--verbose", action="store_true", default=default,
        help="debug log of the set-up: data, model size, norm plan, devices",
    )
