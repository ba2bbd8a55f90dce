"""The ``emanorm`` command: a thin, config-driven layer over the library.

Every argparse parser of the project lives in this package (one module per subcommand); the
library packages never parse arguments. Building the parser imports no torch, scikit-learn or
matplotlib (each handler imports what it needs when it runs), so ``--version``, ``--help``,
``presets`` and every argument or config error answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

from emanorm import __version__
from emanorm.cli.common import Parser, add_verbose
from emanorm.cli.compare import add_compare_parser
from emanorm.cli.doctor import add_doctor_parser
from emanorm.cli.evaluate import add_eval_parsers, add_export_parser
from emanorm.cli.train import add_presets_parser, add_train_parser
from emanorm.errors import Interrupted, Preempted, UserError

DESCRIPTION = """\
Self- and semi-supervised learning with EMA teachers and EMAN
(Exponential Moving Average Normalization, Cai et al., CVPR 2021).

  emanorm train                          FixMatch with an EMAN teacher on Fashion-MNIST (the main job)
  emanorm train --method moco --norm eman --epochs 20
  emanorm eval knn runs/moco-eman-fashion_mnist-s0
  emanorm compare --methods fixmatch --norms bn,eman --seeds 3
  emanorm presets                        list the YAML presets

Every option of `train` has a default; a preset (--config) sets a recipe; flags override it.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="emanorm", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_verbose(parser)
    parser.add_argument("--version", action="version", version=f"emanorm {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    add_train_parser(subparsers)
    add_eval_parsers(subparsers)
    add_export_parser(subparsers)
    add_compare_parser(subparsers)
    add_doctor_parser(subparsers)
    add_presets_parser(subparsers)
    return parser


def wait_passively() -> None:
    """OpenMP threads that wait actively for work spin on a shared CPU and slow every process on it
    (benchmarks/thread_policy.py, docs/performance.md); passive waiting changes no result. A
    decision for the command, not for whoever imports the library: set before torch loads its
    OpenMP runtime (it has no effect after), never over a value the user chose."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int:
    wait_passively()
    if os.environ.get("EMANORM_PARENT_PID"):  # a training child of `compare` (imports torch)
        from emanorm.experiments.grid import die_with_parent

        die_with_parent()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # --verbose: emanorm's own debug lines, not those of matplotlib, PIL or torch
    logging.getLogger("emanorm").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"emanorm: error: {err}", file=sys.stderr)
        return 2
    except Preempted as stopped:
        print(f"emanorm: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except Interrupted as stopped:  # a training run: its checkpoint and --resume
        print(f"emanorm: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:
        print("emanorm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return quiet_broken_pipe()


def quiet_broken_pipe() -> int:
    """``emanorm presets | head -1``: the reader left; exit quietly as Unix tools do (no traceback,
    and none at interpreter exit when Python flushes stdout again)."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 141  # 128 + SIGPIPE, what a shell reports for a killed writer


if __name__ == "__main__":
    sys.exit(main())
