"""``emanorm train`` and ``emanorm presets``."""

from __future__ import annotations

import argparse
from importlib import resources
from typing import Any

from emanorm.cli.common import add_command, key_value, positive_int
from emanorm.data.datasets import DATASETS
from emanorm.evaluation.monitor import knn_monitor
from emanorm.methods import METHODS as METHOD_CLASSES
from emanorm.models import BACKBONES
from emanorm.train import resolve_config, train
from emanorm.train.config import (
    CHOICES,
    DEFAULTS,
    METHODS,
    NORMS,
    dump_config,
    load_config_source,
    preset_names,
)

TRAIN_HELP = """\
Train a method with a chosen normalization. Without --config the small preset for the method
(small-<method>) is used; flags override the preset. The run directory holds config.yaml,
labeled_split.csv, metrics.jsonl, tb/ (TensorBoard), checkpoints/last.pt, summary.json and
curves.png. Accuracies are percents in every file. --print-config shows the resolved config.
Multi-GPU / multi-node: torchrun --nproc_per_node N -m emanorm train ... (docs/cluster.md:
multi-node with c10d rendezvous, SLURM). SIGTERM or SIGUSR1 stops the run after the current
step with a checkpoint and exit status 75 (resumable); rerun with --resume to continue.
"""


def _choices(values: Any) -> str:
    return ", ".join(str(v) for v in values)


def _default(key: str) -> str:
    """``(default X)`` from the config defaults; without --config the method's small preset also
    sets some keys, which the help says once at the top."""
    return f"(default {DEFAULTS[key]})"


def add_train_parser(subparsers: Any) -> None:
    p = add_command(subparsers, "train", "train a method (the main job)", TRAIN_HELP)
    what = p.add_argument_group("what to train")
    what.add_argument("--method", help=f"one of {_choices(METHODS)} {_default('method')}")
    what.add_argument("--norm", help=f"one of {_choices(NORMS)} {_default('norm')}")
    what.add_argument("--dataset", help=f"one of {_choices(DATASETS)} {_default('dataset')}")
    what.add_argument("--data-dir", help="where the dataset lives (standard layouts; see docs/data.md)")
    what.add_argument("--backbone", help=f"one of {_choices(BACKBONES)} {_default('backbone')}")
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
    opt.add_argument("--optimizer", help=f"one of {_choices(CHOICES['optimizer'])} {_default('optimizer')}")
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
        "--calibrate-bn", dest="calibrate_bn_batches", type=int, metavar="N",
        help="before step 0, set the student's BatchNorm statistics from N training batches (cumulative "
        "average, no gradient) and start the teacher from them: an EMAN / PN teacher then does not "
        "start from mean 0 / variance 1 (0: off, the paper's start; 20 is plenty; docs/methods.md)",
    )
    opt.add_argument(
        "--method-arg",
        action="append",
        type=key_value,
        metavar="KEY=VALUE",
        help="a method option, e.g. threshold=0.95 (repeatable; see docs/methods.md)",
    )
    run = p.add_argument_group("running")
    run.add_argument(
        "--seed", type=int, help=f"seed of the labeled split, weights and batches {_default('seed')}"
    )
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
    run.add_argument("--device", choices=CHOICES["device"], help=_default("device"))
    run.add_argument("--num-workers", type=int, help="data loader workers (file datasets)")
    run.add_argument(
        "--amp", choices=CHOICES["amp"], help="autocast (auto: bf16 on GPU, off on CPU; fp16 needs CUDA)"
    )
    run.add_argument("--compile", action="store_true", default=None, help="torch.compile the training step")
    run.add_argument(
        "--eval-every", type=int, help="kNN / test-accuracy monitor every N epochs (0: only at the end)"
    )
    run.add_argument(
        "--checkpoint-every-steps", type=int, help="also checkpoint every N steps (0: per epoch)"
    )
    run.add_argument("--init-from", help="start the backbone from a run directory or checkpoint")
    run.add_argument(
        "--init-which", choices=CHOICES["init_which"],
        help=f"which network of --init-from {_default('init_which')}",
    )
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
    run.add_argument(
        "--no-progress", action="store_true", help="no progress bar (a line per tenth of the steps instead)"
    )
    run.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit (no training)"
    )
    run.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                     help="debug log of the set-up: data, model size, norm plan, devices")
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
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    summary = train(
        cfg, monitor=knn_monitor, resume=args.resume, force=args.force, progress=not args.no_progress
    )
    if summary.get("run_dir"):
        print(format_report(summary))
    return 0


def has_teacher(method: str) -> bool:
    """Whether a method trains a separate teacher (the supervised baseline does not)."""
    cls = METHOD_CLASSES.get(method)
    return cls is None or cls.name != "supervised"


def format_report(summary: dict[str, Any]) -> str:
    """The lines ``emanorm train`` ends with: accuracies (percent), the kNN protocol, threads."""
    final = summary.get("final", {})
    environment = summary.get("environment") or {}
    threads = f", {environment['threads']} CPU thread(s)" if "threads" in environment else ""
    lines = [
        f"\n{summary['method']} with norm={summary['norm']} on {summary['dataset']}: "
        f"{summary['steps']} steps, {summary['labeled']} labeled images, "
        f"{summary['wall_clock_s']:.0f} s{threads}"
    ]
    networks = ("teacher", "student") if has_teacher(summary["method"]) else ("teacher",)
    for which in networks:
        parts = []
        if f"test_acc_{which}" in final:
            parts.append(f"test accuracy {final[f'test_acc_{which}']:.2f}%")
        if f"knn_{which}" in final:
            protocol = ""
            if "knn_bank" in final:
                protocol = f" (k={final['knn_k']}, bank of {final['knn_bank']:,} training images)"
            parts.append(f"kNN accuracy {final[f'knn_{which}']:.2f}%{protocol}")
        if parts:
            label = which if len(networks) > 1 else "model"
            lines.append(f"  {label:8s} " + ", ".join(parts))
    lines.append(f"  run directory: {summary['run_dir']}")
    return "\n".join(lines)


def run_presets(args: argparse.Namespace) -> int:
    if args.name:
        load_config_source(args.name)  # an unknown name: one line listing the presets
        print(preset_text(args.name), end="")
        return 0
    for name in preset_names():
        source = load_config_source(name)
        print(f"{name:32s} {source.get('description', '')}")
    return 0


def preset_text(name: str) -> str:
    """A preset's YAML as shipped (its comments included)."""
    return (resources.files("emanorm") / "configs" / f"{name}.yaml").read_text()


def add_presets_parser(subparsers: Any) -> None:
    presets = subparsers.add_parser(
        "presets", help="list the YAML presets, or print one",
        description="Without NAME: every preset with its description. With NAME: that preset's YAML "
        "(`emanorm train --config NAME --print-config` shows it resolved with the defaults).",
    )
    presets.add_argument("name", nargs="?", metavar="NAME", help="a preset to print")
    presets.set_defaults(func=run_presets)
