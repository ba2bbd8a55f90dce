"""The ``emanorm eval {knn,linear,finetune,retrieval,lowshot}`` and ``emanorm export`` commands.

``add_eval_parsers(subparsers)`` and ``add_export_parser(subparsers)`` add the parsers; each leaf
parser sets ``func(args) -> int``. Every result is written as JSON (default
``RUN_DIR/eval_<protocol>_<which>.json``) and printed as a small table. Mistakes a user can fix
raise :class:`emanorm.errors.UserError`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from emanorm.cli.common import fraction, positive_int
from emanorm.data import DatasetInfo, build_augmentation, load_dataset, select_labeled
from emanorm.errors import UserError
from emanorm.evaluation.export import EXPORT_FORMATS, backbone_state_dict, export_backbone, load_exported
from emanorm.evaluation.features import (
    ImageSource,
    assert_frozen,
    dataset_batches,
    extract_features,
    resolve_device,
)
from emanorm.evaluation.finetune import DEFAULT_BACKBONE_LRS, finetune
from emanorm.evaluation.knn import knn_predict
from emanorm.evaluation.linear import DEFAULT_LINEAR_LRS, linear_probe
from emanorm.evaluation.lowshot import DEFAULT_SHOTS, MultiLabelSVMTask, lowshot_svm
from emanorm.evaluation.monitor import percent
from emanorm.evaluation.retrieval import retrieval_scores
from emanorm.evaluation.settings import FinetuneSettings, LinearSettings, ProbeSettings
from emanorm.evaluation.transfer import adapted_transform, describe_adaptation
from emanorm.train.recipe import load_backbone

PROTOCOLS = ("knn", "linear", "finetune", "retrieval", "lowshot")
WHICH = ("teacher", "student")
_CONFIG_KEYS = ("method", "norm", "backbone", "dataset", "seed", "steps", "epochs")
# File datasets that load at any size: a run's image size is used directly (no second resize).
_SIZED_DATASETS = ("imagenet", "folder", "voc2007")


# --- the upstream pieces, behind small functions (tests replace them with fakes) -------------------


def _load_backbone(path: str, which: str) -> tuple[nn.Module, dict[str, Any]]:
    """``emanorm.train.load_backbone`` with user-facing errors."""
    if not Path(path).exists():
        raise UserError(f"no run directory or checkpoint at '{path}'")
    try:
        backbone, config = load_backbone(path, which=which)
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise UserError(f"cannot load the {which} backbone from '{path}': {err}") from err
    return backbone, dict(config or {})


def _load_dataset(name: str, split: str, data_dir: str | None, **options: Any) -> ImageSource:
    return load_dataset(name, split, data_dir=data_dir, **options)


def _dataset_info(fields: dict[str, Any]) -> Any:
    return DatasetInfo(**{**fields, "mean": tuple(fields["mean"]), "std": tuple(fields["std"])})


def _augmentation(preset: str, info: Any) -> nn.Module:
    return build_augmentation(preset, info)


def _select_labeled(targets: Tensor, num_classes: int, **kwargs: Any) -> Tensor:
    return select_labeled(targets, num_classes, **kwargs)


# --- argument parsing --------------------------------------------------------------------------------


def _device(text: str) -> str:
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"device must be auto, cpu, cuda or cuda:N, got {text!r}")


def _common_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT", help="a run directory or a checkpoint .pt file")
    p.add_argument("--which", choices=WHICH, default="teacher", help="network to evaluate (default: teacher)")
    p.add_argument("--dataset", help="dataset name (default: the run's)")
    p.add_argument("--data-dir", help="dataset directory (default: the run's)")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument(
        "--labels-per-class", type=positive_int, metavar="K", help="use K training labels per class"
    )
    labels.add_argument(
        "--label-fraction", type=fraction, metavar="F", help="use a fraction of training labels: 0.01 or 1%%"
    )
    labels.add_argument("--label-index-csv", metavar="FILE", help="labeled subset as a CSV with column Index")
    p.add_argument("--seed", type=int, help="seed of the labeled subset and of training (default: the run's)")
    p.add_argument(
        "--train-split", default="auto", help="training split (default: 'trainval' for voc2007, else 'train')"
    )
    p.add_argument("--test-split", default="auto", help="evaluation split (default: 'test', else 'val')")
    p.add_argument(
        "--out", metavar="FILE.json",
            help="result file (default: RUN_DIR/eval_<protocol>_<which>[_<labels>].json)"
    )
    p.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument(
        "--batch-size", type=positive_int, default=256, help="images per forward pass (default: 256)"
    )
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _add_protocol_options(parser: argparse.ArgumentParser) -> None:
    """The options the trained protocols (linear, finetune) share; defaults from ``ProbeSettings``."""
    defaults = ProbeSettings()
    add = parser.add_argument
    add("--epochs", type=positive_int, default=defaults.epochs, help="(default %(default)s)")
    add("--weight-decay", type=float, default=defaults.weight_decay, help="(default %(default)s)")
    add("--val-fraction", type=float, default=defaults.val_fraction,
        help="validation share of the labels for the lr search (default %(default)s)")
    add("--repeats", type=positive_int, default=1,
        help="label subsets (seeds seed..seed+N-1) (default %(default)s)")


def add_eval_parsers(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``eval`` with one subcommand per protocol to an ``argparse`` subparsers object."""
    common = _common_parser()
    ev = subparsers.add_parser(
        "eval",
        help="evaluate a trained backbone",
        description="Evaluate a run's teacher or student backbone.",
    )
    sub = ev.add_subparsers(dest="protocol", metavar="{" + ",".join(PROTOCOLS) + "}", required=True)

    knn = sub.add_parser("knn", parents=[common], help="weighted kNN on frozen features (train -> test)")
    knn.add_argument("--k", type=positive_int, default=20, help="neighbours (default: 20)")
    knn.add_argument("--temperature", type=float, default=0.07, help="vote temperature (default: 0.07)")
    knn.set_defaults(func=run_knn)

    lin = sub.add_parser("linear", parents=[common], help="linear classifier on frozen features")
    lin.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LINEAR_LRS),
                     help="lr grid (default %(default)s)")
    lin.add_argument("--probe-batch-size", type=positive_int, default=256,
                     help="classifier batch size (default %(default)s)")
    _add_protocol_options(lin)
    lin.set_defaults(func=run_linear)

    ft = sub.add_parser("finetune", parents=[common], help="fine-tune backbone + classifier on the labels")
    ft.add_argument("--backbone-lrs", type=float, nargs="+", default=list(DEFAULT_BACKBONE_LRS),
                    help="backbone lr grid (default %(default)s)")
    ft.add_argument(
        "--classifier-lr", type=float, default=0.1,
            help="paper: 1.0 for 1%% labels, 0.1 for 10%% (default %(default)s)"
    )
    _add_protocol_options(ft)
    ft.set_defaults(func=run_finetune)

    ret = sub.add_parser("retrieval", parents=[common], help="top-k mAP / recall (train = database)")
    ret.add_argument("--topk", type=positive_int, default=1000,
        help="retrieved items scored (default %(default)s)")
    ret.set_defaults(func=run_retrieval)

    low = sub.add_parser("lowshot", parents=[common], help="linear SVMs on k images per class")
    low.add_argument("--shots", type=positive_int, nargs="+", default=list(DEFAULT_SHOTS),
                     help="images per class (default %(default)s)")
    low.add_argument("--draws", type=positive_int, default=5,
        help="draws per shot count (default %(default)s)")
    low.add_argument(
        "--val-per-class", type=positive_int, default=10,
            help="validation images per class for C (default %(default)s)"
    )
    low.set_defaults(func=run_lowshot)
    return ev


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``export`` (backbone weights for torchvision / safetensors) to a subparsers object."""
    p = subparsers.add_parser(
        "export",
        help="export a backbone's weights",
        description="Write a run's backbone state_dict (classifier excluded), loadable with strict=True "
        "into the matching torchvision model whose fc is nn.Identity().",
    )
    p.add_argument("run", metavar="RUN_DIR", help="a run directory or a checkpoint .pt file")
    p.add_argument("--which", choices=WHICH, default="teacher")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="torchvision")
    p.add_argument("--out", metavar="PATH", help="default: RUN_DIR/export/backbone_<which>.{pth,safetensors}")
    p.set_defaults(func=run_export)
    return p


# --- shared set-up -----------------------------------------------------------------------------------


def run_dir_of(path: str | Path) -> Path:
    """The run directory of a run directory or of a checkpoint file (``RUN_DIR/checkpoints/x.pt``)."""
    path = Path(path)
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


@dataclass
class EvalContext:
    """Everything a protocol needs once the run and the data are loaded."""

    args: argparse.Namespace
    backbone: nn.Module
    config: dict[str, Any]
    dataset: str
    data_dir: str | None
    test_split: str
    train_set: ImageSource
    test_set: ImageSource
    info: Any
    num_classes: int
    device: torch.device
    transform: nn.Module
    seed: int
    test_indices: Tensor
    labels: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    #: The input the backbone was trained on (the run's DatasetInfo; the target's when unknown).
    input_info: Any = None
    #: How the target's images were changed to match ``input_info`` (None: not at all).
    adaptation: dict[str, Any] | None = None
    #: Multi-label target (VOC07): labels are ``train_set.label_matrix`` / ``test_set.label_matrix``.
    multilabel: bool = False

    @property
    def progress(self) -> bool:
        return not self.args.no_progress

    def labeled(self, seed: int | None = None) -> Tensor:
        """Training indices with labels: the requested subset (for ``seed``) or every labeled image."""
        targets = torch.as_tensor(self.train_set.targets).long()
        a = self.args
        if a.labels_per_class is None and a.label_fraction in (None, 1.0) and a.label_index_csv is None:
            return torch.nonzero(targets >= 0).flatten()
        try:
            idx = _select_labeled(
                targets,
                self.num_classes,
                labels_per_class=a.labels_per_class,
                fraction=None if a.labels_per_class else a.label_fraction,
                index_csv=a.label_index_csv,
                seed=self.seed if seed is None else seed,
            )
        except (ValueError, FileNotFoundError) as err:
            raise UserError(f"cannot select the labeled subset: {err}") from err
        return torch.as_tensor(idx, dtype=torch.long)

    def features(self, dataset: ImageSource, indices: Tensor, desc: str) -> tuple[Tensor, Tensor]:
        batches = dataset_batches(dataset, indices, self.args.batch_size)
        return extract_features(
            self.backbone,
            batches,
            self.device,
            transform=self.transform,
            amp=self.args.amp,
            progress=self.progress,
            desc=desc,
        )


def _label_setting(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """(JSON description, file-name suffix) of the requested label subset."""
    if args.labels_per_class is not None:
        return {"labels_per_class": args.labels_per_class}, f"_{args.labels_per_class}perclass"
    if args.label_index_csv is not None:
        return {"index_csv": str(args.label_index_csv)}, f"_{Path(args.label_index_csv).stem}"
    if args.label_fraction not in (None, 1.0):
        return {"label_fraction": args.label_fraction}, f"_{args.label_fraction * 100:g}pct"
    return {"label_fraction": 1.0}, ""


def _load_split(name: str, split: str, data_dir: str | None, **options: Any) -> ImageSource:
    try:
        return _load_dataset(name, split, data_dir, **options)
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise UserError(f"cannot load split '{split}' of dataset '{name}': {err}") from err


def _load_test_split(name: str, split: str, data_dir: str | None, **options: Any) -> tuple[ImageSource, str]:
    if split != "auto":
        return _load_split(name, split, data_dir, **options), split
    errors = []
    for candidate in ("test", "val"):
        try:
            return _load_dataset(name, candidate, data_dir, **options), candidate
        except (ValueError, KeyError, FileNotFoundError) as err:
            errors.append(f"{candidate}: {err}")
    raise UserError(f"dataset '{name}' has no 'test' or 'val' split ({'; '.join(errors)}); pass --test-split")


def prepare(args: argparse.Namespace, *, multilabel_ok: bool = False) -> EvalContext:
    """Load the backbone, the datasets and the evaluation transform for an ``eval`` command.

    On a dataset other than the run's, images are brought to the run's input (channels, size,
    normalisation; see :mod:`emanorm.evaluation.transfer`) and the target's own labels are used.
    A multi-label dataset (VOC07) is refused unless ``multilabel_ok`` (low-shot only).
    """
    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device is available; use cpu or auto")
    if Path(args.run).exists():  # before any work: a result that cannot be written would be lost
        check_writable(Path(args.out) if args.out else None, run_dir_of(args.run))
    backbone, config = _load_backbone(args.run, args.which)
    dataset = args.dataset or config.get("dataset")
    if not dataset:
        raise UserError(f"the run at '{args.run}' records no dataset; pass --dataset")
    # The run's data_dir belongs to the run's dataset; another dataset needs its own --data-dir.
    data_dir = args.data_dir or (config.get("data_dir") if dataset == config.get("dataset") else None)
    run_info = _dataset_info(config["dataset_info"]) if config.get("dataset_info") else None
    # File datasets decode straight to the run's image size (one resize, not two).
    options = {"image_size": run_info.image_size} if run_info and dataset in _SIZED_DATASETS else {}
    train_split = getattr(args, "train_split", "auto")  # Namespaces built by hand may lack it
    if train_split == "auto":
        train_split = "trainval" if dataset == "voc2007" else "train"
    train_set = _load_split(dataset, train_split, data_dir, **options)
    test_set, test_split = _load_test_split(dataset, args.test_split, data_dir, **options)
    info = getattr(train_set, "info", None)
    multilabel = bool(getattr(train_set, "multilabel", False))
    if multilabel and not multilabel_ok:
        raise UserError(
            f"dataset '{dataset}' is multi-label; only `emanorm eval lowshot` evaluates it "
            "(one binary SVM per class, mean average precision)"
        )
    num_classes = getattr(info, "num_classes", None)
    if not num_classes:  # an info without a class count (e.g. a generic folder dataset)
        num_classes = int(torch.as_tensor(train_set.targets).max()) + 1
    if multilabel:
        test_indices = torch.arange(len(test_set))
    else:
        test_targets = torch.as_tensor(test_set.targets).long()
        test_indices = torch.nonzero(test_targets >= 0).flatten()
    if len(test_indices) == 0:
        raise UserError(f"split '{test_split}' of '{dataset}' has no labels to evaluate against")
    seed = args.seed if args.seed is not None else int(config.get("seed", 0) or 0)
    backbone.to(device)
    labels, _ = _label_setting(args)
    input_info, adaptation, transform = info, None, None
    if run_info is not None and info is not None:
        input_info, adaptation = run_info, describe_adaptation(info, run_info)
        try:
            transform = adapted_transform(info, run_info, _augmentation("none", run_info))
        except ValueError as err:
            raise UserError(f"cannot feed '{dataset}' images to this run's backbone: {err}") from err
    if transform is None:
        transform = _augmentation("none", info)
    return EvalContext(
        args=args,
        backbone=backbone,
        config=config,
        dataset=dataset,
        data_dir=data_dir,
        test_split=test_split,
        train_set=train_set,
        test_set=test_set,
        info=info,
        num_classes=int(num_classes),
        device=device,
        transform=transform,
        seed=seed,
        test_indices=test_indices,
        labels=labels,
        input_info=input_info,
        adaptation=adaptation,
        multilabel=multilabel,
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (Tensor, np.ndarray, np.generic)):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


#: The scores of the protocols' results (fractions in the library): eval_*.json holds them as
#: percents like every file emanorm writes (docs/evaluation.md, "Units").
PERCENT_KEYS = frozenset(
    {"top1", "top5", "top1_std", "top5_std", "map", "recall", "mean", "std", "scores", "val_scores",
     "val_top1"}
)
#: The score of a learning rate that diverged (``search_lr``); kept as is, it is no fraction.
DIVERGED = -1.0


def _as_percent(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _as_percent(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_percent(v) for v in value]
    if isinstance(value, float) and math.isfinite(value) and value != DIVERGED:
        return percent(value)
    return value


def results_in_percent(results: Any) -> Any:
    """A protocol's results with every score (``PERCENT_KEYS``, at any depth) as a rounded percent;
    counts, learning rates and costs unchanged."""
    if isinstance(results, dict):
        return {
            k: _as_percent(_jsonable(v)) if k in PERCENT_KEYS else results_in_percent(v)
            for k, v in results.items()
        }
    if isinstance(results, (list, tuple)):
        return [results_in_percent(v) for v in results]
    return results


def format_table(title: str, rows: Sequence[tuple[str, str]]) -> str:
    """A two-column plain-text table."""
    width = max([len(name) for name, _ in rows] + [6])
    lines = [title, f"  {'metric':<{width}}  value", f"  {'-' * width}  {'-' * 12}"]
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def finish(
    ctx: EvalContext,
    protocol: str,
    results: dict[str, Any],
    settings: dict[str, Any],
    rows: Sequence[tuple[str, str]],
) -> int:
    """Write the JSON record, print the table, return the exit status 0."""
    args = ctx.args
    _, suffix = _label_setting(args)
    if args.dataset and args.dataset != ctx.config.get("dataset"):
        suffix += f"_{args.dataset}"
    out = Path(args.out) if args.out else run_dir_of(args.run) / f"eval_{protocol}_{args.which}{suffix}.json"
    record = {
        "protocol": protocol,
        "which": args.which,
        "checkpoint": str(args.run),
        "dataset": ctx.dataset,
        "data_dir": ctx.data_dir,
        "test_split": ctx.test_split,
        "labels": ctx.labels,
        "seed": ctx.seed,
        "device": str(ctx.device),
        "settings": settings,
        "unit": "percent",
        "results": results_in_percent(_jsonable(results)),
        "run_config": {k: ctx.config[k] for k in _CONFIG_KEYS if k in ctx.config},
        "input_adaptation": ctx.adaptation,
        "elapsed_s": round(time.time() - ctx.started, 2),
    }
    labels = (
        "all labels"
        if ctx.labels == {"label_fraction": 1.0}
        else ", ".join(f"{k}={v}" for k, v in ctx.labels.items())
    )
    if ctx.adaptation:
        rows = [*rows, *((f"input {k}", str(v)) for k, v in ctx.adaptation.items())]
    # printed first: if the write fails, the result is still on the screen
    print(format_table(f"{protocol} | {args.which} | {ctx.dataset} ({ctx.test_split}) | {labels}", rows))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_jsonable(record), indent=2) + "\n")
    except OSError as err:
        why = err.strerror or err
        raise UserError(f"could not write {out}: {why}; the result is printed above") from None
    print(f"wrote {out}")
    return 0


def check_writable(out: Path | None, default_dir: Path) -> None:
    """Refuse an output that cannot be written: ``out`` a directory, or a folder that is read-only."""
    if out is not None and out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file path")
    folder = out.parent if out is not None else default_dir
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not os.access(folder, os.W_OK):
        raise UserError(f"cannot write to {folder} (read-only); choose another place with --out")


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """A protocol's ValueError comes from a user's setting (too few labels, bad grid): one line."""
    try:
        yield
    except ValueError as err:
        raise UserError(str(err)) from err


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std())


def _repeated_results(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Top-1/top-5 mean and std over the label subsets of ``--repeats``, with every run's record."""
    top1, top1_std = _mean_std([r["top1"] for r in runs])
    top5, top5_std = _mean_std([r["top5"] for r in runs])
    return {"top1": top1, "top5": top5, "top1_std": top1_std, "top5_std": top5_std, "runs": runs}


def _repeated_rows(results: dict[str, Any], lr_name: str, lr_key: str) -> list[tuple[str, str]]:
    """The table of a linear or fine-tuning result: accuracies, each run's chosen lr, labels used."""
    runs = results["runs"]
    return [
        ("top-1 %", _pct(results["top1"])),
        ("top-5 %", _pct(results["top5"])),
        (lr_name, ", ".join(f"{r[lr_key]:g}" for r in runs)),
        ("train labels", str(runs[0]["num_train"])),
    ]


# --- handlers ----------------------------------------------------------------------------------------


def _database_and_queries(ctx: EvalContext, database: str, queries: str) -> tuple[Any, Any]:
    """Frozen features of the labeled training images (the database) and of the test split."""
    with assert_frozen(ctx.backbone):
        return (ctx.features(ctx.train_set, ctx.labeled(), database),
                ctx.features(ctx.test_set, ctx.test_indices, queries))


def run_knn(args: argparse.Namespace) -> int:
    """``emanorm eval knn``: labeled training images are the database, the test split the queries."""
    ctx = prepare(args)
    (db_f, db_y), (q_f, q_y) = _database_and_queries(ctx, "train features", "test features")
    with _user_errors():
        pred = knn_predict(
            db_f.to(ctx.device),
            db_y.to(ctx.device),
            q_f.to(ctx.device),
            k=args.k,
            temperature=args.temperature,
            num_classes=ctx.num_classes,
        )
    top1 = float((pred.cpu() == q_y).float().mean())
    results = {"top1": top1, "num_database": len(db_y), "num_queries": len(q_y)}
    return finish(
        ctx,
        "knn",
        results,
        {"k": args.k, "temperature": args.temperature},
        [("top-1 %", _pct(top1)), ("k", str(args.k)), ("database", str(len(db_y)))],
    )


def run_retrieval(args: argparse.Namespace) -> int:
    """``emanorm eval retrieval``: labeled training images are the database, the test split the queries."""
    ctx = prepare(args)
    (db_f, db_y), (q_f, q_y) = _database_and_queries(ctx, "database features", "query features")
    with _user_errors():
        scores = retrieval_scores(
            db_f.to(ctx.device), db_y.to(ctx.device), q_f.to(ctx.device), q_y.to(ctx.device), topk=args.topk
        )
    results = {**scores, "num_database": len(db_y), "num_queries": len(q_y)}
    return finish(
        ctx,
        "retrieval",
        results,
        {"topk": args.topk},
        [(f"mAP@{args.topk} %", _pct(scores["map"])), (f"recall@{args.topk} %", _pct(scores["recall"]))],
    )


def run_linear(args: argparse.Namespace) -> int:
    """``emanorm eval linear``: frozen features cached once, lr searched on a validation split."""
    ctx = prepare(args)
    seeds = [ctx.seed + r for r in range(args.repeats)]
    subsets = [ctx.labeled(s) for s in seeds]
    union = torch.unique(torch.cat(subsets))
    row = torch.full((len(ctx.train_set),), -1, dtype=torch.long)
    row[union] = torch.arange(len(union))
    probe = LinearSettings(
        lrs=tuple(args.lrs), epochs=args.epochs, batch_size=args.probe_batch_size,
        weight_decay=args.weight_decay, val_fraction=args.val_fraction, device=ctx.device,
        progress=ctx.progress,
    )
    runs = []
    # The whole protocol runs under the frozen check: no weight or BN statistic may move.
    with assert_frozen(ctx.backbone):
        f_u, y_u = ctx.features(ctx.train_set, union, "train features")
        f_t, y_t = ctx.features(ctx.test_set, ctx.test_indices, "test features")
        for seed, subset in zip(seeds, subsets, strict=True):
            with _user_errors():
                part = row[subset]
                runs.append(
                    linear_probe(f_u[part], y_u[part], f_t, y_t, num_classes=ctx.num_classes,
                                 settings=probe, seed=seed)
                )
    results = _repeated_results(runs)
    settings = {
        "lrs": args.lrs,
        "epochs": args.epochs,
        "batch_size": args.probe_batch_size,
        "weight_decay": args.weight_decay,
        "val_fraction": args.val_fraction,
        "seeds": seeds,
        "features": "cached once from the eval transform (no augmentation)",
    }
    rows = _repeated_rows(results, "best lr", "best_lr")
    if len(runs) > 1:
        rows.insert(1, ("top-1 std", _pct(results["top1_std"])))
    return finish(ctx, "linear", results, settings, rows)


def run_finetune(args: argparse.Namespace) -> int:
    """``emanorm eval finetune``: whole network, weak augmentation, backbone lr searched on validation."""
    ctx = prepare(args)
    seeds = [ctx.seed + r for r in range(args.repeats)]
    augment = _augmentation("weak", ctx.input_info)
    if ctx.input_info is not ctx.info:  # another dataset: its images in the run's channels first
        augment = adapted_transform(ctx.info, ctx.input_info, augment)
    tuning = FinetuneSettings(
        backbone_lrs=tuple(args.backbone_lrs), classifier_lr=args.classifier_lr, epochs=args.epochs,
        batch_size=args.batch_size, weight_decay=args.weight_decay, val_fraction=args.val_fraction,
        device=ctx.device, amp=args.amp, progress=ctx.progress,
    )
    runs = []
    with assert_frozen(ctx.backbone):  # finetune trains a copy; the loaded backbone stays as it was
        for seed in seeds:
            with _user_errors():
                runs.append(
                    finetune(
                        ctx.backbone, ctx.train_set, ctx.labeled(seed), ctx.test_set,
                        num_classes=ctx.num_classes, augment=augment, eval_transform=ctx.transform,
                        test_indices=ctx.test_indices, settings=tuning, seed=seed,
                    )
                )
    results = _repeated_results(runs)
    settings = {
        "backbone_lrs": args.backbone_lrs,
        "classifier_lr": args.classifier_lr,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "weight_decay": args.weight_decay,
        "val_fraction": args.val_fraction,
        "seeds": seeds,
        "augmentation": "weak",
    }
    rows = _repeated_rows(results, "backbone lr", "best_backbone_lr")
    return finish(ctx, "finetune", results, settings, rows)


def run_lowshot(args: argparse.Namespace) -> int:
    """``emanorm eval lowshot``: linear SVMs on k labeled images per class, C picked on training data.

    Single-label targets: one multi-class SVM, accuracy. Multi-label targets (VOC07): one binary
    SVM per class on k positives per class, mean average precision over classes.
    """
    ctx = prepare(args, multilabel_ok=True)
    task = None
    if ctx.multilabel:
        if ctx.labels != {"label_fraction": 1.0}:
            raise UserError(
                f"'{ctx.dataset}' is multi-label: low-shot draws k positives per class itself; "
                "--labels-per-class, --label-fraction and --label-index-csv do not apply"
            )
        pool = torch.arange(len(ctx.train_set))
        pool_labels = torch.as_tensor(ctx.train_set.label_matrix)
        test_labels = torch.as_tensor(ctx.test_set.label_matrix)[ctx.test_indices]
        task = MultiLabelSVMTask(random_state=ctx.seed)
    else:
        pool = ctx.labeled()
        pool_labels = torch.as_tensor(ctx.train_set.targets).long()[pool]

    def pool_features(positions: np.ndarray) -> Tensor:
        return ctx.features(ctx.train_set, pool[torch.as_tensor(positions)], "train features")[0]

    with assert_frozen(ctx.backbone):
        f_t, y_t = ctx.features(ctx.test_set, ctx.test_indices, "test features")
        if ctx.multilabel:
            y_t = test_labels
        with _user_errors():
            res = lowshot_svm(
                pool_features,
                pool_labels,
                f_t,
                y_t,
                shots=args.shots,
                draws=args.draws,
                seed=ctx.seed,
                val_per_class=args.val_per_class,
                task=task,
                progress=ctx.progress,
            )
    metric = "mAP" if ctx.multilabel else "accuracy"
    rows = [
        (f"{k}-shot {metric} %", f"{_pct(v['mean'])} +- {_pct(v['std'])}") for k, v in res["per_shot"].items()
    ]
    settings = {
        "shots": res["shots"],
        "draws": args.draws,
        "costs": res["costs"],
        "val_per_class": args.val_per_class,
        "features": "L2-normalised, frozen",
        "metric": metric,
        "train_split": getattr(ctx.train_set, "split", None),
    }
    if ctx.multilabel:
        names = list(getattr(ctx.train_set, "classes", []) or range(ctx.num_classes))
        in_train = (pool_labels == 1).any(0)
        test_pos, test_neg = (test_labels == 1).any(0), (test_labels == -1).any(0)
        scored = torch.nonzero(in_train & test_pos & test_neg).flatten().tolist()
        settings["sampling"] = "k positives per class, union over classes; difficult (0) ignored per class"
        settings["classes_scored"] = [str(names[c]) for c in scored]
        rows.append(("classes scored", f"{len(scored)} of {ctx.num_classes}"))
    return finish(ctx, "lowshot", res, settings, rows)


def run_export(args: argparse.Namespace) -> int:
    """``emanorm export``: the backbone's state_dict for torchvision or safetensors."""
    suffix = ".pth" if args.format == "torchvision" else ".safetensors"
    out = Path(args.out) if args.out else run_dir_of(args.run) / "export" / f"backbone_{args.which}{suffix}"
    if (out.suffix == ".safetensors") != (args.format == "safetensors"):
        raise UserError(
            f"--out {out} does not fit --format {args.format}: name it *{suffix}, or choose the other format"
        )
    if Path(args.run).exists():
        check_writable(out, out.parent)
    backbone, config = _load_backbone(args.run, args.which)
    metadata = {"which": args.which, "source": str(args.run)}
    metadata.update({k: str(config[k]) for k in ("backbone", "method", "norm", "dataset") if k in config})
    try:
        export_backbone(backbone, out, args.format, metadata=metadata)
    except (OSError, RuntimeError) as err:  # torch reports a failed write as RuntimeError
        raise UserError(f"could not write {out}: {getattr(err, 'strerror', None) or err}") from None
    # Read the file back: what was written is exactly the backbone's state.
    expected, written = backbone_state_dict(backbone), load_exported(out)
    if expected.keys() != written.keys() or any(not torch.equal(expected[k], written[k]) for k in expected):
        raise RuntimeError(f"export check failed: {out} does not match the backbone")
    print(f"wrote {out} ({len(written)} tensors, {args.format})")
    if args.format == "torchvision":
        from emanorm.evaluation.export_recipe import torchvision_recipe  # deferred: builds torchvision models

        image_size = int((config.get("dataset_info") or {}).get("image_size", 224))
        recipe = torchvision_recipe(backbone, str(config.get("backbone", "")), out, image_size=image_size)
        if recipe:
            print(f"load: {recipe}")
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "knn": run_knn,
    "linear": run_linear,
    "finetune": run_finetune,
    "retrieval": run_retrieval,
    "lowshot": run_lowshot,
    "export": run_export,
}
