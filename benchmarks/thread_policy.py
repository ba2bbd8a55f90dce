"""OpenMP thread policies side by side on this machine: seconds per training step of the main job.

    OMP_NUM_THREADS= python benchmarks/thread_policy.py [--steps 20] [--rounds 3]

Each policy runs the main-job recipe (small-fixmatch: FixMatch + EMAN, Fashion-MNIST, batch 64 +
192) in a fresh subprocess (an OpenMP setting only takes effect at process start) for ``--steps``
timed steps after 3 untimed ones. The policies alternate round by round, so a change in machine
load hits all of them alike. Printed: the median seconds per step of each policy over the rounds
and its ratio to ``default`` (torch's own choice: one thread per core, active waiting). The last
line is ``best=<policy> ratio=<default seconds / best seconds>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

POLICIES: dict[str, dict[str, str]] = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "one_thread": {"OMP_NUM_THREADS": "1"},
}
OMP_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")


def worker(steps: int) -> None:
    """Time ``steps`` main-job steps in this process; print one JSON line."""
    import torch

    from emanorm.train import build_run, resolve_config, train_step

    run = build_run(resolve_config("small-fixmatch", {"device": "cpu"}))
    batches = iter(run.stream)
    times = []
    for step in range(steps + 3):
        batch = next(batches)
        started = time.perf_counter()
        train_step(run.step_fn, run.method, batch, step, run.total_steps, run.optimizer, run.scheduler,
                   amp=run.amp, scaler=run.scaler)
        if step >= 3:
            times.append(time.perf_counter() - started)
    print(json.dumps({"threads": torch.get_num_threads(), "s_per_step": statistics.median(times)}))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.steps)
        return {}
    base = {k: v for k, v in os.environ.items() if k not in OMP_VARIABLES}
    results: dict[str, list[float]] = {name: [] for name in POLICIES}
    threads: dict[str, int] = {}
    for round_index in range(args.rounds):
        for name, env in POLICIES.items():
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", "--steps", str(args.steps)],
                env={**base, **env}, capture_output=True, text=True, check=True,
            )
            record = json.loads(proc.stdout.strip().splitlines()[-1])
            results[name].append(record["s_per_step"])
            threads[name] = record["threads"]
            print(f"round {round_index + 1} {name:10s} {record['s_per_step']:.3f} s/step "
                  f"({record['threads']} thread(s))", flush=True)
    medians = {name: statistics.median(values) for name, values in results.items()}
    print(f"cpus={os.cpu_count()} load1={os.getloadavg()[0]:.1f} steps={args.steps} rounds={args.rounds}")
    for name, value in medians.items():
        print(f"{name:10s} {value:.3f} s/step  ratio to default {medians['default'] / value:.2f}x "
              f"({threads[name]} thread(s))")
    best = min(medians, key=medians.get)
    print(f"best={best} ratio={medians['default'] / medians[best]:.2f}")
    return medians


if __name__ == "__main__":
    main()
