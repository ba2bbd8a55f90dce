"""The ``emanorm eval {knn,linear,finetune,retrieval,lowshot}`` and ``emanorm export`` commands.

``add_eval_parsers(subparsers)`` and ``add_export_parser(subparsers)`` add the parsers; each leaf
parser sets ``func(args) -> int``. The workflows are :mod:`emanorm.evaluation.protocols`; here the
flags become their arguments. Every result is written as JSON (default
``RUN_DIR/eval_<protocol>_<which>.json``) and printed as a small table. Mistakes a user can fix
raise :class:`emanorm.errors.UserError`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

# torch-free: `emanorm eval ... --help` answers before torch; each handler imports the workflows
from emanorm.catalog import (
    DEFAULT_BACKBONE_LRS,
    DEFAULT_LINEAR_LRS,
    DEFAULT_SHOTS,
    EVAL_NETWORKS,
    EVAL_PROTOCOLS,
    EXPORT_FORMATS,
)
from emanorm.cli.common import fraction, positive_int
from emanorm.errors import UserError
from emanorm.evaluation.settings import ProbeSettings

if TYPE_CHECKING:
    from emanorm.evaluation.context import EvalContext
    from emanorm.evaluation.records import ProtocolResult

PROTOCOLS = EVAL_PROTOCOLS
WHICH = EVAL_NETWORKS

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

    knn = _protocol_parser(sub, common, "knn", "weighted kNN on frozen features (train -> test)")
    knn.add_argument("--k", type=positive_int, default=20, help="neighbours (default: 20)")
    knn.add_argument("--temperature", type=float, default=0.07, help="vote temperature (default: 0.07)")

    lin = _protocol_parser(sub, common, "linear", "linear classifier on frozen features")
    lin.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LINEAR_LRS),
                     help="lr grid (default %(default)s)")
    lin.add_argument("--probe-batch-size", type=positive_int, default=256,
                     help="classifier batch size (default %(default)s)")
    _add_protocol_options(lin)

    ft = _protocol_parser(sub, common, "finetune", "fine-tune backbone + classifier on the labels")
    ft.add_argument("--backbone-lrs", type=float, nargs="+", default=list(DEFAULT_BACKBONE_LRS),
                    help="backbone lr grid (default %(default)s)")
    ft.add_argument(
        "--classifier-lr", type=float, default=0.1,
            help="paper: 1.0 for 1%% labels, 0.1 for 10%% (default %(default)s)"
    )
    _add_protocol_options(ft)

    ret = _protocol_parser(sub, common, "retrieval", "top-k mAP / recall (train = database)")
    ret.add_argument("--topk", type=positive_int, default=1000,
        help="retrieved items scored (default %(default)s)")

    low = _protocol_parser(sub, common, "lowshot", "linear SVMs on k images per class")
    low.add_argument("--shots", type=positive_int, nargs="+", default=list(DEFAULT_SHOTS),
                     help="images per class (default %(default)s)")
    low.add_argument("--draws", type=positive_int, default=5,
        help="draws per shot count (default %(default)s)")
    low.add_argument(
        "--val-per-class", type=positive_int, default=10,
            help="validation images per class for C (default %(default)s)"
    )
    return ev


def _protocol_parser(
    subparsers: Any, common: argparse.ArgumentParser, name: str, help: str
) -> argparse.ArgumentParser:
    """``eval NAME``: the flags every protocol shares (``common``), run by ``HANDLERS[name]``; the
    caller adds the protocol's own flags."""
    parser = subparsers.add_parser(name, parents=[common], help=help)
    parser.set_defaults(func=HANDLERS[name])
    return parser


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
    p.set_defaults(func=HANDLERS["export"])
    return p


# --- handlers ----------------------------------------------------------------------------------------


def refuse_missing_run(run: str) -> None:
    """A run directory or checkpoint that does not exist, refused before torch loads with the
    message :func:`emanorm.evaluation.context.load_run_backbone` gives."""
    if not Path(run).exists():
        raise UserError(f"no run directory or checkpoint at '{run}'")


def _context(args: argparse.Namespace, *, multilabel_ok: bool = False) -> EvalContext:
    """Load the run and the data the flags name (Namespaces built by hand may lack a flag)."""
    from emanorm.evaluation.context import EvalRequest, prepare  # torch: imported when the command runs

    names = [f.name for f in fields(EvalRequest)]
    request = EvalRequest(**{name: getattr(args, name) for name in names if hasattr(args, name)})
    return prepare(request, multilabel_ok=multilabel_ok)


def _finish(ctx: EvalContext, result: ProtocolResult) -> int:
    """Print the table, write the JSON record, return the exit status 0."""
    from emanorm.evaluation import records  # torch: imported when the command runs

    out = records.result_path(ctx, result.protocol)
    record = records.result_record(ctx, result)
    # printed first: if the write fails, the result is still on the screen
    print(records.format_table(records.result_title(ctx, result), records.result_rows(ctx, result)))
    records.write_json(out, record)
    print(f"wrote {out}")
    return 0


def _evaluate(args: argparse.Namespace, protocol: str, *, multilabel_ok: bool = False, **options: Any) -> int:
    """Run ``protocols.<protocol>`` on the run the flags name: its table, its JSON record, exit 0."""
    refuse_missing_run(args.run)
    from emanorm.evaluation import protocols  # torch: imported when the command runs

    ctx = _context(args, multilabel_ok=multilabel_ok)
    return _finish(ctx, getattr(protocols, protocol)(ctx, **options))


def run_knn(args: argparse.Namespace) -> int:
    """``emanorm eval knn``: labeled training images are the database, the test split the queries."""
    return _evaluate(args, "eval_knn", k=args.k, temperature=args.temperature)


def run_retrieval(args: argparse.Namespace) -> int:
    """``emanorm eval retrieval``: labeled training images are the database, the test split the queries."""
    return _evaluate(args, "eval_retrieval", topk=args.topk)


def _training_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options the trained protocols share (``_add_protocol_options``)."""
    return {name: getattr(args, name) for name in ("epochs", "weight_decay", "val_fraction", "repeats")}


def run_linear(args: argparse.Namespace) -> int:
    """``emanorm eval linear``: frozen features cached once, lr searched on a validation split."""
    return _evaluate(args, "eval_linear", lrs=args.lrs, probe_batch_size=args.probe_batch_size,
                     **_training_options(args))


def run_finetune(args: argparse.Namespace) -> int:
    """``emanorm eval finetune``: whole network, weak augmentation, backbone lr searched on validation."""
    return _evaluate(args, "eval_finetune", backbone_lrs=args.backbone_lrs,
                     classifier_lr=args.classifier_lr, **_training_options(args))


def run_lowshot(args: argparse.Namespace) -> int:
    """``emanorm eval lowshot``: linear SVMs on k labeled images per class (mAP on multi-label data)."""
    return _evaluate(args, "eval_lowshot", multilabel_ok=True, shots=args.shots, draws=args.draws,
                     val_per_class=args.val_per_class)


def run_export(args: argparse.Namespace) -> int:
    """``emanorm export``: the backbone's state_dict for torchvision or safetensors."""
    # export_run checks that --out fits --format first; a missing run is refused before torch loads
    if args.out is None or (Path(args.out).suffix == ".safetensors") == (args.format == "safetensors"):
        refuse_missing_run(args.run)
    from emanorm.evaluation import protocols  # torch: imported when the command runs

    out, tensors, recipe = protocols.export_run(args.run, args.which, args.format, args.out)
    print(f"wrote {out} ({tensors} tensors, {args.format})")
    if recipe:
        print(f"load: {recipe}")
    return 0


#: Subcommand -> its handler: the one place the parsers above take ``func`` from.
HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "knn": run_knn,
    "linear": run_linear,
    "finetune": run_finetune,
    "retrieval": run_retrieval,
    "lowshot": run_lowshot,
    "export": run_export,
}
