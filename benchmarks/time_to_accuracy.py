"""Wall-clock for the main-job recipe (small-fixmatch: FixMatch + EMAN teacher, Fashion-MNIST, 10 labels
per class, 1500 steps) to reach a test accuracy: emanorm's step against the paper's-code reference step.

    python benchmarks/time_to_accuracy.py --target 69     # about the README's accuracy (15-20 min in all)
    python benchmarks/time_to_accuracy.py --max-steps 150 --eval-every 50 --test-size 2000   # a short look

Both paths start from the same seed and train in alternating chunks of ``--eval-every`` steps (so a
change in machine load hits both alike); after each chunk the teacher's test accuracy is measured
(untimed). Only training is timed, reference loader start-up included (its workers are stopped while
the other path trains and during evaluation). A path stops at ``--target``, at ``--max-steps`` or when
its training time passes ``--budget-minutes``. Without ``--target`` the target is the best accuracy
both paths reached. The last line is ``time_ratio=<reference seconds / emanorm seconds to the target>``
(``nan`` if a path never reached it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # the benchmarks folder is not a package: imported by path
    EmanormPath,
    OtherLoad,
    ReferenceFixMatch,
    accuracy_on,
    bench_config,
    load_run_dataset,
    machine_info,
    parse_set,
    print_machine,
    sync,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=float, default=None, help="teacher test accuracy (%%) to reach")
    p.add_argument("--max-steps", type=int, default=None, help="step budget (default: the recipe's 1500)")
    p.add_argument("--budget-minutes", type=float, default=None, help="training-time budget per path")
    p.add_argument("--eval-every", type=int, default=150, help="steps between accuracy measurements")
    p.add_argument("--test-size", type=int, default=None, help="test images per evaluation (default all)")
    p.add_argument("--workers", type=int, default=2, help="reference DataLoader workers per loader")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="emanorm config override, e.g. channels_last=true (repeatable)")
    p.add_argument("--json", default=None, help="write the curves to this JSON file")
    args = p.parse_args(argv)
    if args.eval_every < 1:
        p.error(f"--eval-every must be >= 1, got {args.eval_every}")
    return args


def first_time_at(curve: list[dict[str, float]], target: float) -> float:
    """Training seconds at the first evaluation whose accuracy reaches ``target`` (nan if none)."""
    return next((c["seconds"] for c in curve if c["accuracy"] >= target), math.nan)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    base = {"seed": args.seed, **({"max_steps": args.max_steps} if args.max_steps else {})}
    cfg = bench_config("fixmatch", args.device, {**base, **parse_set(args.set)})
    ref_cfg = bench_config("fixmatch", args.device, base)
    device = torch.device(args.device)
    info = machine_info(device)
    print_machine(info)
    train_ds, test_ds = load_run_dataset(cfg, "train"), load_run_dataset(cfg, "test")
    ours = EmanormPath(cfg, train_ds)
    torch.manual_seed(args.seed)
    theirs = ReferenceFixMatch(ref_cfg, train_ds, workers=args.workers)
    theirs.warm_steps = 0  # every reference step counts here
    paths = {"emanorm": ours, "reference": theirs}
    max_steps = cfg["max_steps"] or ours.total_steps
    budget = math.inf if args.budget_minutes is None else 60 * args.budget_minutes
    curves: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
    seconds = dict.fromkeys(paths, 0.0)
    steps = dict.fromkeys(paths, 0)
    active = set(paths)
    print(f"# recipe {cfg['preset']}: {max_steps} steps, eval every {args.eval_every}, target "
          f"{args.target if args.target is not None else 'best both reach'}; emanorm overrides "
          f"{parse_set(args.set) or 'none'}; reference {args.workers} workers per loader", flush=True)
    round_ = 0
    others = OtherLoad().__enter__()
    while active:
        order = list(paths) if round_ % 2 == 0 else list(paths)[::-1]
        for name in order:
            if name not in active:
                continue
            path = paths[name]
            n = min(args.eval_every, max_steps - steps[name])
            sync(path.device)
            start = time.perf_counter()
            for _ in range(n):
                path.step()
            sync(path.device)
            seconds[name] += time.perf_counter() - start
            path.end_block()
            steps[name] += n
            acc = accuracy_on(path.teacher_classifier(), test_ds, path.device, args.test_size)
            curves[name].append({"step": steps[name], "seconds": round(seconds[name], 2), "accuracy": acc})
            print(f"{name:9s} step {steps[name]:5d}  {seconds[name]:8.1f} s  teacher test acc {acc:6.2f}",
                  flush=True)
            done = (steps[name] >= max_steps or seconds[name] >= budget
                    or (args.target is not None and acc >= args.target))
            if done:
                active.discard(name)
        round_ += 1
    others.__exit__()
    print(f"# other processes used {100 * others.share:.0f}% of the CPU during the run")
    target = args.target
    if target is None:
        target = min(max(c["accuracy"] for c in curve) for curve in curves.values())
    times = {name: first_time_at(curve, target) for name, curve in curves.items()}
    ratio = times["reference"] / times["emanorm"] if times["emanorm"] > 0 else math.nan
    print(f"target {target:.2f}%: emanorm {times['emanorm']:.1f} s, reference {times['reference']:.1f} s")
    result = {"machine": info, "args": vars(args), "target": target, "seconds_to_target": times,
              "time_ratio": ratio, "curves": curves, "other_processes_cpu_share": round(others.share, 3)}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"time_ratio={ratio:.2f}")
    return result


if __name__ == "__main__":
    main()
