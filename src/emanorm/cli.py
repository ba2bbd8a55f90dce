"""The ``emanorm`` command: a thin, config-driven layer over the library."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import yaml

from emanorm.cli_doctor import add_doctor_parser
from emanorm.errors import UserError

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

TRAIN_HELP = """\
Train a method with a chosen normalization. Without --config the small preset for the method
(small-<method>) is used; flags override the preset. The run directory holds config.yaml,
labeled_split.csv, metrics.jsonl, tb/ (TensorBoard), checkpoints/last.pt and summary.json.
Multi-GPU / multi-node: torchrun --nproc_per_node N -m emanorm train ...
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage is one --help away)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip().replace("-", "_"), yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"cannot parse the value of {text!r}") from None


def add_train_parser(subparsers: Any) -> None:
    from emanorm.train.config import METHODS, NORMS

    p = subparsers.add_parser(
        "train",
        help="train a method (the main job)",
        description=TRAIN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_argument_group("what to train")
    what.add_argument("--method", help=f"one of {', '.join(METHODS)} (default fixmatch)")
    what.add_argument("--norm", help=f"one of {', '.join(NORMS)} (default eman)")
    what.add_argument("--dataset", help="fashion_mnist, cifar10, cifar100, stl10, imagenet, folder")
    what.add_argument("--data-dir", help="where the dataset lives (standard layouts; see docs/data.md)")
    what.add_argument(
        "--backbone",
        help="small, resnet18, resnet50, resnet50x2, resnet18_cifar, wrn28_2, timm:NAME, torchvision:NAME",
    )
    what.add_argument("--config", help="a preset name (see `emanorm presets`) or a YAML file")
    labels = p.add_argument_group("labels (semi-supervised methods)").add_mutually_exclusive_group()
    labels.add_argument("--labels-per-class", type=int, help="labeled images per class")
    labels.add_argument("--label-fraction", type=float, help="fraction of labels per class, e.g. 0.01 or 0.1")
    labels.add_argument(
        "--label-index-csv", help="a CSV with column Index (the paper's ImageNet 1%%/10%% files)"
    )
    budget = p.add_argument_group("budget").add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, help="passes over the (unlabeled) training set")
    budget.add_argument("--max-steps", type=int, help="optimizer steps")
    opt = p.add_argument_group("optimisation and teacher")
    opt.add_argument(
        "--batch-size", type=int, help="global batch (labeled batch for semi-supervised methods)"
    )
    opt.add_argument(
        "--unlabeled-ratio", type=int, help="unlabeled batch = ratio x batch size (FixMatch's mu)"
    )
    opt.add_argument("--lr", type=float, help="initial learning rate")
    opt.add_argument("--optimizer", help="sgd, lars or adamw")
    opt.add_argument("--ema-momentum", type=float, help="teacher parameter momentum m of Eq. 1")
    opt.add_argument(
        "--eman-momentum", type=float, help="EMAN statistics momentum of Eq. 9 (Table 8); default: = m"
    )
    opt.add_argument(
        "--bn-momentum", type=float, help="PyTorch BN momentum for statistics a teacher collects itself"
    )
    opt.add_argument(
        "--method-arg",
        action="append",
        type=_key_value,
        metavar="KEY=VALUE",
        help="a method option, e.g. threshold=0.95 (repeatable; see docs/methods.md)",
    )
    run = p.add_argument_group("running")
    run.add_argument("--seed", type=int)
    run.add_argument("--out", help="run directory (default runs/<method>-<norm>-<dataset>-s<seed>)")
    run.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last.pt")
    run.add_argument(
        "--force", action="store_true", help="overwrite a finished run, or resume despite a changed config"
    )
    run.add_argument("--device", choices=["auto", "cpu", "cuda"])
    run.add_argument("--num-workers", type=int, help="data loader workers (file datasets)")
    run.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], help="autocast (auto: bf16 on GPU)")
    run.add_argument("--compile", action="store_true", default=None, help="torch.compile the training step")
    run.add_argument(
        "--eval-every", type=int, help="kNN / test-accuracy monitor every N epochs (0: only at the end)"
    )
    run.add_argument(
        "--checkpoint-every-steps", type=int, help="also checkpoint every N steps (0: per epoch)"
    )
    run.add_argument("--init-from", help="start the backbone from a run directory or checkpoint")
    run.add_argument("--init-which", choices=["teacher", "student"], help="which network of --init-from")
    run.add_argument(
        "--set",
        action="append",
        type=_key_value,
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set warmup_epochs=5 (repeatable)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)


def train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = (
        "method",
        "norm",
        "dataset",
        "data_dir",
        "backbone",
        "labels_per_class",
        "label_fraction",
        "label_index_csv",
        "epochs",
        "max_steps",
        "batch_size",
        "unlabeled_ratio",
        "lr",
        "optimizer",
        "ema_momentum",
        "eman_momentum",
        "bn_momentum",
        "seed",
        "out",
        "device",
        "num_workers",
        "amp",
        "compile",
        "eval_every",
        "checkpoint_every_steps",
        "init_from",
        "init_which",
    )
    overrides = {k: getattr(args, k) for k in keys}
    for key, value in args.set or []:
        overrides[key] = value
    if args.method_arg:
        overrides["method_args"] = dict(args.method_arg)
    return overrides


def run_train(args: argparse.Namespace) -> int:
    from emanorm.train import resolve_config, train

    cfg = resolve_config(args.config, train_overrides(args))
    summary = train(cfg, resume=args.resume, force=args.force, progress=not args.no_progress)
    if summary.get("run_dir"):
        print(format_report(summary))
    return 0


def format_report(summary: dict[str, Any]) -> str:
    final = summary.get("final", {})
    lines = [
        f"\n{summary['method']} with norm={summary['norm']} on {summary['dataset']}: "
        f"{summary['steps']} steps, {summary['labeled']} labeled images, {summary['wall_clock_s']:.0f} s"
    ]
    for which in ("teacher", "student"):
        parts = []
        if f"test_acc_{which}" in final:
            parts.append(f"test accuracy {final[f'test_acc_{which}']:.2f}%")
        if f"knn_{which}" in final:
            parts.append(f"kNN accuracy {final[f'knn_{which}']:.2f}%")
        if parts:
            lines.append(f"  {which:8s} " + ", ".join(parts))
    lines.append(f"  run directory: {summary['run_dir']}")
    return "\n".join(lines)


def run_presets(args: argparse.Namespace) -> int:
    from emanorm.train.config import load_config_source, preset_names

    for name in preset_names():
        source = load_config_source(name)
        print(f"{name:32s} {source.get('description', '')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="emanorm", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="more log output")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    add_train_parser(subparsers)
    from emanorm.evaluation.commands import add_eval_parsers, add_export_parser

    add_eval_parsers(subparsers)
    add_export_parser(subparsers)
    try:
        from emanorm.experiments.commands import add_compare_parser

        add_compare_parser(subparsers)
    except ImportError:
        pass
    add_doctor_parser(subparsers)
    presets = subparsers.add_parser("presets", help="list the YAML presets")
    presets.set_defaults(func=run_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"emanorm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("emanorm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
