"""The kNN curves of a compare's results.json at a few points of training, as a Markdown table.

    python docs/results/curve_table.py runs/results/ssl-byol-10ep/results.json --epochs 1,2,5,10

Each run's entry holds its kNN monitor curve (``[step, accuracy]`` pairs, one per ``--eval-every``
epoch). For each row and each requested epoch: mean ± std over seeds of the accuracy at that
epoch's last step, and the paired difference of every row to ``--against`` at the last epoch.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def cell(values: list[float], sign: str = "") -> str:
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):{sign}.2f} ± {std:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, help="results.json of an emanorm compare")
    p.add_argument("--epochs", default="1,2,5,10", help="epochs to tabulate (default %(default)s)")
    p.add_argument("--against", default="bn", help="row the paired differences are taken to")
    args = p.parse_args()
    record = json.loads(args.results.read_text())
    epochs = [int(e) for e in args.epochs.split(",")]
    runs = [r for r in record["runs"] if r.get("status") == "ok" and r.get("curve")]
    rows = [v["label"] for v in record["variants"]]

    def at_epoch(run: dict, epoch: int) -> float | None:
        steps_per_epoch = run["steps"] // run["epochs"]
        points = dict((int(step), value) for step, value in run["curve"])
        return points.get(epoch * steps_per_epoch)

    print("| row | " + " | ".join(f"epoch {e}" for e in epochs) + " | seeds |")
    print("|---|" + "---|" * (len(epochs) + 1))
    for row in rows:
        mine = [r for r in runs if r["variant"] == row]
        cells = [cell([v for r in mine if (v := at_epoch(r, e)) is not None]) for e in epochs]
        print(f"| {row} | " + " | ".join(cells) + f" | {len(mine)} |")

    last = {(r["variant"], r["seed"]): at_epoch(r, epochs[-1]) for r in runs}
    print(f"\npaired difference to `{args.against}` at epoch {epochs[-1]} (points, seeds higher):\n")
    for row in rows:
        if row == args.against:
            continue
        pairs = [(last[(row, s)], last.get((args.against, s))) for v, s in last if v == row]
        diffs = [mine - base for mine, base in pairs if mine is not None and base is not None]
        if diffs:
            print(f"- {row}: {cell(diffs, '+')} ({sum(d > 0 for d in diffs)}/{len(diffs)})")


if __name__ == "__main__":
    main()
