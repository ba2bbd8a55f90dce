"""Experiments: the ``emanorm compare`` grid (variants x methods x seeds), its tables and curves.

See docs/compare.md.

The names load lazily (PEP 562): ``emanorm compare`` parses and checks its grid (methods, norms,
variants, ``--set``) with :mod:`emanorm.experiments.grid` and the planner before torch is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emanorm._lazy import lazy_package

if TYPE_CHECKING:  # what type checkers and IDEs see
    from emanorm.experiments.evaluate import LinearProtocol, evaluate_run, linear_probe_run, read_curve
    from emanorm.experiments.grid import (
        RunOutcome,
        RunSpec,
        Variant,
        build_variants,
        parse_variant,
        plan_grid,
        resolve_run_config,
        run_grid,
    )
    from emanorm.experiments.plots import band, plot_curves
    from emanorm.experiments.report import Stats, format_stats, markdown_table, render_markdown, summarize

_MODULES = {
    "evaluate": ("LinearProtocol", "evaluate_run", "linear_probe_run", "read_curve"),
    "grid": (
        "RunOutcome", "RunSpec", "Variant", "build_variants", "parse_variant", "plan_grid",
        "resolve_run_config", "run_grid",
    ),
    "plots": ("band", "plot_curves"),
    "report": ("Stats", "format_stats", "markdown_table", "render_markdown", "summarize"),
}
_WHERE = {name: f"emanorm.experiments.{module}" for module, names in _MODULES.items() for name in names}
lazy_package(__name__, _WHERE)

__all__ = [
    "LinearProtocol",
    "RunOutcome",
    "RunSpec",
    "Stats",
    "Variant",
    "band",
    "build_variants",
    "evaluate_run",
    "format_stats",
    "linear_probe_run",
    "markdown_table",
    "parse_variant",
    "plan_grid",
    "plot_curves",
    "read_curve",
    "render_markdown",
    "resolve_run_config",
    "run_grid",
    "summarize",
]
