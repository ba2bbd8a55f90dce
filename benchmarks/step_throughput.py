"""Training images per second of emanorm's own step against the paper's-code reference step.

    python benchmarks/step_throughput.py --quick            # < 1 min on a quiet 2-core CPU
    python benchmarks/step_throughput.py                    # the figures of docs/performance.md
    python benchmarks/step_throughput.py --set channels_last=true
    python benchmarks/step_throughput.py --device cuda --backbone resnet18 --standin 32
    python benchmarks/step_throughput.py --device cuda --backbone resnet50 --standin 224 --batch-size 128

emanorm: the step ``emanorm train --method M`` runs (its small-M preset: data pipeline, method,
teacher update, the trainer's defaults; ``--set key=value`` changes the emanorm config only).
Reference: the same model, loss, batch and data written the way the paper's public code runs it:
per-sample PIL transforms in a DataLoader with ``--workers`` worker processes, fp32 NCHW, the EMA
update as a Python loop over state_dict, no compilation. Both run in this process, in alternating
timed blocks after warm-up; images/s counts dataset images per step (FixMatch: labeled +
unlabeled; MoCo/BYOL: the batch), not augmented views. Peak memory comes from a fresh process per
(method, path) (``--no-memory`` skips it). The last line is
``speedup=<the smallest of the per-method speedups>``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # the benchmarks folder is not a package: imported by path
    REFERENCES,
    Path_,
    bench_config,
    build_emanorm,
    comparison_main,
    comparison_parser,
    parse_comparison_args,
    shared_overrides,
    train_dataset,
)

METHODS = ("fixmatch", "moco", "byol")


def build(method: str, which: str, args: Any, cache: dict[str, Any]) -> Path_:
    """The emanorm or the reference path of ``method`` (the dataset is loaded once per process)."""
    if which == "emanorm":
        return build_emanorm(method, args, cache)
    if which != "reference":
        raise ValueError(f"unknown path {which!r}; allowed: emanorm, reference")
    # the reference runs fp32 NCHW with no compilation whatever --set asks of emanorm
    cfg = bench_config(method, args.device, shared_overrides(args))
    if "ds" not in cache:
        cache["ds"] = train_dataset(cfg, args.standin, args.standin_count)
    path = REFERENCES[method](cfg, cache["ds"], workers=args.workers)
    path.warm_steps = args.block_warmup
    path.threads = args.other_threads
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_comparison_args(comparison_parser(__doc__, METHODS, "reference"), argv, METHODS)
    return comparison_main(args, build=build, other="reference", script=__file__)


if __name__ == "__main__":
    main()
