"""Pseudo-label diagnostics of FixMatch runs from their metrics.jsonl, as a Markdown table.

    python docs/results/pseudo_labels.py runs/results/fixmatch/runs --rows default,bn,eman

For each row (run directories ``fixmatch-<row>-s<seed>``): the mask rate (share of unlabeled
images whose teacher confidence passed the threshold) averaged over a window of logged steps, and
the precision of the pseudo-labels that passed (``pl_precision``, against the true labels, which
the trainer logs for diagnosis only). Mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

WINDOWS = ((0, 100), (100, 300), (300, 700), (700, 1500))


def window_means(metrics: Path, key: str) -> list[float | None]:
    records = [json.loads(line) for line in metrics.read_text().splitlines() if '"train"' in line]
    out = []
    for lo, hi in WINDOWS:
        values = [r[key] for r in records if lo < r["step"] <= hi and r.get(key) is not None]
        out.append(statistics.fmean(values) if values else None)
    return out


def cell(values: list[float | None]) -> str:
    finite = [v for v in values if v is not None]
    if not finite:
        return "–"
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return f"{100 * statistics.fmean(finite):.1f} ± {100 * std:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, help="folder holding fixmatch-<row>-s<seed> run directories")
    p.add_argument("--rows", default="default,bn,eman")
    args = p.parse_args()
    header = [f"steps {lo + 1}-{hi}" for lo, hi in WINDOWS]
    for key, title in (("mask", "mask rate (%)"), ("pl_precision", "pseudo-label precision (%)")):
        print(f"\n{title}, mean ± std over seeds\n")
        print("| row | " + " | ".join(header) + " | seeds |")
        print("|---|" + "---|" * (len(header) + 1))
        for row in args.rows.split(","):
            runs = sorted(args.runs.glob(f"fixmatch-{row}-s[0-9]*/metrics.jsonl"))
            per_run = [window_means(m, key) for m in runs]
            cells = [cell([r[i] for r in per_run]) for i in range(len(WINDOWS))]
            print(f"| {row} | " + " | ".join(cells) + f" | {len(runs)} |")


if __name__ == "__main__":
    main()
