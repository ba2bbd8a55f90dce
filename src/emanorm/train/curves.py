"""``curves.png`` of one run: loss, mask rate and the evaluations along training, from metrics.jsonl.

Written into every run directory at the end of training (matplotlib's Agg backend, no display).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from emanorm.train.run_records import is_integer, read_metrics_records

log = logging.getLogger("emanorm")

CURVES_NAME = "curves.png"
#: Keys of an evaluation record that describe the protocol rather than measure anything.
PROTOCOL_KEYS = ("knn_k", "knn_bank", "eval_s", "light")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl with an integer step; damaged lines (a killed write's torn
    line, binary bytes, a list, a string step) are skipped with one warning: run files are the
    trainer's records, never inputs that stop a reader."""
    return read_metrics_records(path)


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None (a string, a bool, inf, an integer too large for a float)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], value) for r in records if (value := _number(r.get(key))) is not None]
    return [s for s, _ in points], [v for _, v in points]


def plot_run_curves(metrics_file: str | Path, path: str | Path) -> Path | None:
    """Draw loss, mask rate (FixMatch) and every evaluation metric against the step; ``None``
    when metrics.jsonl holds no training record."""
    metrics_file, path = Path(metrics_file), Path(path)
    records = read_metrics(metrics_file) if metrics_file.exists() else []
    train = [r for r in records if r.get("kind", "train") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train:
        return None
    panels: list[tuple[str, list[tuple[str, list[dict[str, Any]]]]]] = [("loss", [("loss", train)])]
    if any("mask" in r for r in train):
        panels.append(("mask rate (fraction of the unlabeled batch)", [("mask", train)]))
    eval_keys = sorted({k for r in evals for k in r if k not in ("kind", "step", "epoch", *PROTOCOL_KEYS)})
    if eval_keys:
        title = "evaluation (%)"
        # in step order; only integers (a damaged record's list or string is no bank size)
        banks = list(dict.fromkeys(r["knn_bank"] for r in evals if is_integer(r.get("knn_bank"))))
        ks = sorted({r["knn_k"] for r in evals if is_integer(r.get("knn_k"))})
        if banks:
            shown = f"bank {banks[0]}"
            if len(banks) > 1:
                shown += f" along training, {banks[-1]} at the end"
            title += f"\nkNN k={'/'.join(map(str, ks))}, {shown}"
        panels.append((title, [(k, evals) for k in eval_keys]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels, strict=True):
        for key, source in lines:
            steps, values = _series(source, key)
            ax.plot(steps, values, marker="o" if source is evals else None, markersize=3, label=key)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_run_curves(run_dir: str | Path) -> Path | None:
    """``RUN_DIR/curves.png`` from ``RUN_DIR/metrics.jsonl``; a failure to draw is logged, never
    fatal (the run's results are already written)."""
    run_dir = Path(run_dir)
    try:
        return plot_run_curves(run_dir / "metrics.jsonl", run_dir / CURVES_NAME)
    except (OSError, ValueError, RuntimeError) as err:
        log.warning("could not draw %s: %s", run_dir / CURVES_NAME, err)
        return None
