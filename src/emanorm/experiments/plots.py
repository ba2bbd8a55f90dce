"""Figure-3-style curves: accuracy along training, one panel per method, one line per variant,
the mean over seeds with a shaded ±1 std band. Drawn with matplotlib's Agg backend (no display)."""

from __future__ import annotations

import math
import statistics
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Curve = Sequence[tuple[int, float]]


def band(curves: Sequence[Curve]) -> tuple[list[int], list[float], list[float]]:
    """Steps, mean and std over the curves at each step any of them holds (std 0 where only one does)."""
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for step, value in curve:
            if value is not None and math.isfinite(value):
                by_step.setdefault(int(step), []).append(float(value))
    steps = sorted(by_step)
    means = [statistics.fmean(by_step[s]) for s in steps]
    stds = [statistics.stdev(by_step[s]) if len(by_step[s]) > 1 else 0.0 for s in steps]
    return steps, means, stds


def plot_curves(
    curves: Mapping[str, Mapping[str, Sequence[Curve]]],
    path: str | Path,
    *,
    methods: Sequence[str] | None = None,
    variants: Sequence[str] | None = None,
    ylabel: str = "kNN top-1 (%)",
    title: str | None = None,
) -> Path:
    """Write a PNG of ``curves[method][variant] = [curve per seed]``; returns its path.

    Methods and variants keep the given order; a variant with no points in a panel is left out
    of it, and an empty panel says so.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global state, safe in threads and tests

    methods = list(methods or curves.keys())
    order = list(variants or dict.fromkeys(v for m in methods for v in curves.get(m, {})))
    colours = {v: f"C{i % 10}" for i, v in enumerate(order)}
    fig = Figure(figsize=(4.2 * max(1, len(methods)), 3.4), layout="constrained")
    axes = fig.subplots(1, max(1, len(methods)), squeeze=False)[0]
    for ax, method in zip(axes, methods, strict=False):
        drawn = 0
        for variant in order:
            steps, means, stds = band(curves.get(method, {}).get(variant, ()))
            if not steps:
                continue
            colour = colours[variant]
            ax.plot(steps, means, color=colour, marker="o" if len(steps) < 12 else None, ms=3, label=variant)
            if len(steps) == 1 and stds[0] > 0:  # a band needs two steps: show the spread as a bar
                ax.errorbar(steps, means, yerr=stds, color=colour, capsize=3, linewidth=1)
            elif any(stds):
                low = [m - s for m, s in zip(means, stds, strict=True)]
                high = [m + s for m, s in zip(means, stds, strict=True)]
                ax.fill_between(steps, low, high, color=colour, alpha=0.2, linewidth=0)
            drawn += 1
        ax.set_title(method)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize="small", title=None)
        else:
            ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
    axes[0].set_ylabel(ylabel)
    if title:  # wrapped to the figure's width: a one-panel figure is narrow
        fig.suptitle("\n".join(textwrap.wrap(title, width=int(11 * 4.2 * max(1, len(methods))))))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def curves_from_entries(entries: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[Curve]]]:
    """``{method: {variant: [curve per seed]}}`` from the raw entries of a comparison."""
    curves: dict[str, dict[str, list[Curve]]] = {}
    for entry in entries:
        if entry.get("status") == "ok" and entry.get("curve"):
            curves.setdefault(entry["method"], {}).setdefault(entry["variant"], []).append(
                [tuple(p) for p in entry["curve"]]  # type: ignore[misc]
            )
    return curves
