"""The Figure-3-style figure of docs/results.md from the run directories of its compare commands.

    python docs/results/make_figure.py runs/results docs/results/curves.png

Panels: FixMatch teacher test accuracy and kNN accuracy (rows default, bn, eman), MoCo (default,
bn, eman, random-init) and BYOL (bn, eman) teacher kNN; mean over seeds with a ±1 std band.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from emanorm.experiments.evaluate import read_curve
from emanorm.experiments.plots import plot_curves

PANELS = {  # title: (compare folder, method, metric, rows)
    "FixMatch: teacher test top-1": ("fixmatch", "fixmatch", "test_acc_teacher", ("default", "bn", "eman")),
    "FixMatch: teacher kNN": ("fixmatch", "fixmatch", "knn_teacher", ("default", "bn", "eman")),
    "MoCo v2: teacher kNN": ("ssl-moco", "moco", "knn_teacher", ("default", "bn", "eman", "random-init")),
    "BYOL: teacher kNN": ("ssl-byol", "byol", "knn_teacher", ("bn", "eman")),  # default = bn on one process
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, help="the folder holding the compare output folders")
    p.add_argument("out", type=Path)
    args = p.parse_args()
    curves: dict[str, dict[str, list]] = {}
    for title, (folder, method, metric, rows) in PANELS.items():
        for row in rows:
            runs = sorted((args.results / folder / "runs").glob(f"{method}-{row}-s[0-9]*"))
            found = [c for c in (read_curve(r, metric) for r in runs if (r / "summary.json").exists()) if c]
            if found:
                curves.setdefault(title, {})[row] = found
    path = plot_curves(
        curves,
        args.out,
        methods=list(PANELS),
        variants=["default", "bn", "eman", "random-init"],
        ylabel="top-1 (%)",
        title="Fashion-MNIST, small network: accuracy along training (mean ± std over seeds)",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
