"""kNN monitor of run directories (finished or not) as a markdown table, from their metrics.jsonl.

    python docs/results/knn_from_metrics.py runs/results/ssl-dino-10ep/runs/dino-{bn,eman}-s0

One row per run, one column per evaluated epoch (teacher kNN %, student in brackets). For runs a
compare did not finish, so results.json (and curve_table.py) has nothing on them yet.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def evals(run_dir: Path) -> dict[int, tuple[float, float]]:
    """Epoch -> (teacher kNN, student kNN) of every eval record."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "eval":
            out[int(record["epoch"])] = (record["knn_teacher"], record["knn_student"])
    return out


def main(paths: list[str]) -> None:
    runs = {p.rstrip("/"): evals(Path(p)) for p in paths}
    epochs = sorted({e for r in runs.values() for e in r})
    print("| run | " + " | ".join(f"epoch {e}" for e in epochs) + " |")
    print("|---|" + "---|" * len(epochs))
    for name, by_epoch in runs.items():
        cells = [f"{by_epoch[e][0]:.2f} ({by_epoch[e][1]:.2f})" if e in by_epoch else "–" for e in epochs]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
