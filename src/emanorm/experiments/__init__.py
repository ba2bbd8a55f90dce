"""Experiments: the ``emanorm compare`` grid (variants x methods x seeds), its tables and curves.

See docs/compare.md.
"""

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
