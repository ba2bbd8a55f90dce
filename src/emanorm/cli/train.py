"""``emanorm train`` and ``emanorm presets``."""

from __future__ import annotations

import argparse
from typing import Any

from emanorm.cli.common import add_command, key_value, positive_int
from emanorm.evaluation.monitor import knn_monitor
from emanorm.train import resolve_config, train
from emanorm.train.config import DEFAULTS, METHODS, NORMS, load_config_source, preset_names

TRAIN_HELP = """\
Train a method with a chosen normalization. Without --config the small preset for the method
(small-<method>) is used; flags override the preset. The run directory holds config.yaml,
labeled_split.csv, metrics.jsonl, tb/ (TensorBoard), checkpoints/last.pt and summary.json.
Multi-GPU / multi-node: torchrun --nproc_per_node N -m emanorm train ... (docs/cluster.md:
multi-node with c10d rendezvous, SLURM). SIGTERM or SIGUSR1 stops the run after the current
step with a checkpoint and exit status 75 (resumable); rerun with --resume to continue.
"""


def add_train_parser(subparsers: Any) -> None:
    p = add_command(subparsers, "train", "train a method (the main job)", TRAIN_HELP)
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
        "--accumulate",
        type=positive_int,
        metavar="N",
        help="gradient accumulation: split each batch into N micro-batches (batch-size / N per process "
        "each) and step once; same schedule, less memory (default 1)",
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
        "--bn-splits", type=int, help="BatchNorm statistics per split of each process's batch, e.g. 8: "
        "the paper's per-GPU BN on one process (default 1)",
    )
    opt.add_argument(
        "--method-arg",
        action="append",
        type=key_value,
        metavar="KEY=VALUE",
        help="a method option, e.g. threshold=0.95 (repeatable; see docs/methods.md)",
    )
    run = p.add_argument_group("running")
    run.add_argument("--seed", type=int)
    run.add_argument("--out", help="run directory (default runs/<method>-<norm>-<dataset>-s<seed>)")
    run.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        type=resume_mode,
        metavar="auto",
        help="continue from RUN_DIR/checkpoints/last.pt; 'auto' (for job scripts): resume when a "
        "checkpoint exists, start fresh otherwise",
    )
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
        type=key_value,
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set warmup_epochs=5 (repeatable)",
    )
    run.add_argument(
        "--logger",
        metavar="LIST",
        help="comma list of jsonl, tensorboard, mlflow, wandb (default jsonl,tensorboard; metrics.jsonl "
        "is always written). mlflow: RUN_DIR/mlruns or $MLFLOW_TRACKING_URI (pip install "
        "'emanorm[mlflow]'); wandb: offline under RUN_DIR/wandb without $WANDB_API_KEY "
        "('emanorm[wandb]')",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)


def resume_mode(text: str) -> str | bool:
    if text != "auto":
        raise argparse.ArgumentTypeError(f"--resume takes no value or 'auto', got {text!r}")
    return text


def train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys the flags set: every flag named like a config key (flags left out are None
    and keep the preset's value)."""
    return {k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None}


def explicit_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``--set`` and ``--method-arg`` values, applied as given (``--set key=null`` clears a key)."""
    explicit: dict[str, Any] = dict(args.set or [])
    if args.method_arg:
        explicit["method_args"] = dict(args.method_arg)
    return explicit


def run_train(args: argparse.Namespace) -> int:
    cfg = resolve_config(args.config, train_overrides(args), explicit=explicit_settings(args))
    summary = train(
        cfg, monitor=knn_monitor, resume=args.resume, force=args.force, progress=not args.no_progress
    )
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
    for name in preset_names():
        source = load_config_source(name)
        print(f"{name:32s} {source.get('description', '')}")
    return 0




def add_presets_parser(subparsers: Any) -> None:
    presets = subparsers.add_parser("presets", help="list the YAML presets")
    presets.set_defaults(func=run_presets)
