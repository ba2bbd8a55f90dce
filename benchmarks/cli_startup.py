"""Start-up of the ``emanorm`` command against ``import torch`` alone, side by side.

    python benchmarks/cli_startup.py [--rounds 5] [--command "--version"]

Each round runs, in fresh interpreters and alternating so both see the same machine load,
``python -m emanorm --version`` (or ``--command``, e.g. ``"train --norm EMAN"``) and
``python -c "import torch"``; prints every round's wall-clock seconds, the medians and their
ratio (the command's time / torch's import).
Before issue 31 the command imported torch, scikit-learn and matplotlib before it looked at its
arguments, so the ratio was above 1; docs/performance.md records the measurement.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import time


def timed_run(argv: list[str]) -> float:
    """Wall-clock seconds of one fresh process (an error command such as ``train --norm EMAN``
    exits 2, which is what is timed; a traceback is not)."""
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if "Traceback" in done.stderr:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--command", default="--version", help="emanorm arguments (default --version)")
    args = parser.parse_args(argv)
    command = [sys.executable, "-m", "emanorm", *shlex.split(args.command)]
    torch_import = [sys.executable, "-c", "import torch"]
    timed_run(command), timed_run(torch_import)  # warm the file cache for both
    cli_times, torch_times = [], []
    for round_index in range(args.rounds):
        pair = [(command, cli_times), (torch_import, torch_times)]
        for argv_, times in pair if round_index % 2 == 0 else pair[::-1]:
            times.append(timed_run(argv_))
        print(f"round {round_index + 1}: emanorm {args.command} {cli_times[-1]:.3f} s, "
              f"import torch {torch_times[-1]:.3f} s", flush=True)
    cli, torch_s = statistics.median(cli_times), statistics.median(torch_times)
    print(f"median: emanorm {args.command} {cli:.3f} s, import torch {torch_s:.3f} s, "
          f"ratio {cli / torch_s:.2f}")
    return {"cli_s": cli, "torch_s": torch_s, "ratio": cli / torch_s}


if __name__ == "__main__":
    main()
