"""Training-log curves of runs (loss, DINO's target entropy, ...) at a few steps, as a Markdown table.

    python docs/results/train_curves.py runs/c27/dino-s*/runs/dino-* --metrics loss,target_entropy \
        --steps 100,234,468,1170,2340 --plot docs/results/coldstart-dino-train-curves.png

Reads each run directory's ``metrics.jsonl`` (its ``kind: train`` records). Runs are grouped into
rows by their directory name without the ``-sN`` seed suffix; each cell is the mean ± std over the
row's seeds of the metric at the last logged step at or before the requested one. The last column
is what ``emanorm doctor`` says of each run's logs today (``emanorm.collapse``), which can differ
from the alarm the run printed with an older rule.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

from emanorm.collapse import scan_records


def read_records(run_dir: Path) -> list[dict]:
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill: the rest is whole
        if isinstance(record, dict) and record.get("kind", "train") == "train":
            records.append(record)
    return records


def value_at(records: list[dict], metric: str, step: int) -> float | None:
    """The metric at the last log at or before ``step``; None when the run has not reached ``step``."""
    if not records or records[-1].get("step", 0) < step:
        return None
    logged = [r[metric] for r in records
              if isinstance(r.get(metric), int | float) and r.get("step", 0) <= step]
    return float(logged[-1]) if logged else None


def cell(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run directories (each with metrics.jsonl)")
    p.add_argument("--metrics", default="loss", help="comma-separated logged metrics (default %(default)s)")
    p.add_argument("--steps", default="100,500,1000,2000", help="steps to tabulate (default %(default)s)")
    p.add_argument("--plot", type=Path, help="also draw every run's curves into this PNG")
    args = p.parse_args()
    metrics = [m for m in args.metrics.split(",") if m]
    steps = [int(s) for s in args.steps.split(",") if s]
    missing = [str(r) for r in args.runs if not (r / "metrics.jsonl").is_file()]
    if missing:
        p.error(f"no metrics.jsonl in {', '.join(missing)}")
    rows: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    logs = {}
    for run in sorted(args.runs):
        row = re.sub(r"-s\d+$", "", run.name)
        logs[run] = records = read_records(run)
        method = run.name.split("-")[0]
        options = json.loads((run / "summary.json").read_text()).get("config", {}).get("method_args", {}) \
            if (run / "summary.json").is_file() else {}
        if method == "dino":
            options = {"out_dim": 4096, **options}  # small-dino's K when the summary is not written yet
        alarm, _ = scan_records(records, method, options)
        seed = run.name.rsplit("-s", 1)[-1]
        rows[row]["alarm"].append(f"s{seed}: " + (f"step {alarm.step}" if alarm else "none"))
        rows[row]["last"].append(records[-1]["step"] if records else 0)
        for metric in metrics:
            for step in steps:
                value = value_at(records, metric, step)
                if value is not None:
                    rows[row][f"{metric}@{step}"].append(value)
    for metric in metrics:
        print(f"\n{metric} at step (mean ± std over seeds)\n")
        header = " | ".join(str(s) for s in steps)
        print(f"| row | {header} | last step | collapse alarm (today's rule) |")
        print("|---" * (len(steps) + 3) + "|")
        for row, cells in rows.items():
            values = " | ".join(cell(cells[f"{metric}@{s}"]) for s in steps)
            last = ", ".join(map(str, cells["last"]))
            print(f"| {row} | {values} | {last} | {'; '.join(cells['alarm'])} |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4), squeeze=False)
        for ax, metric in zip(axes[0], metrics, strict=True):
            for run, records in logs.items():
                points = [(r["step"], r[metric]) for r in records if isinstance(r.get(metric), int | float)]
                if points:
                    ax.plot(*zip(*points, strict=True), label=run.name, linewidth=1)
            ax.set_xlabel("step")
            ax.set_title(metric)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
