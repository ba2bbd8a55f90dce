"""``emanorm train`` and ``emanorm presets``."""

from __future__ import annotations

import argparse
import os
from importlib import resources
from pathlib import Path
from typing import Any

from emanorm.catalog import (
    BACKBONES,
    DATA_DIR_LAYOUTS,
    FASHION_MNIST_SYSTEM_DIR,
    METHOD_NAMES,
    METHOD_NORMS,
    METHOD_OPTIONS,
)
from emanorm.cli.common import add_command, add_repeatable, add_verbose, key_value
from emanorm.errors import UserError
from emanorm.train.config import (
    BUDGET,
    DEFAULTS,
    FIELDS,
    LABEL_KEYS,
    LABELS,
    OPTIMISATION,
    RUNNING,
    SEMI_SUPERVISED,
    WHAT,
    dump_config,
    load_config_source,
    preset_names,
    resolve_config,
)
from emanorm.train.lock import CHECKPOINT_FILE, check_run_dir_early, default_run_dir

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


def _flag_help(key: str, help_text: str | None = None) -> str:
    """A flag's help from its schema field: the text, the allowed values, the default (a given
    ``help_text`` says its own default)."""
    meta = FIELDS[key].metadata
    text = help_text or meta["help"]
    if key == "backbone":  # free-form (timm:<name>), so listed here rather than checked as choices
        text = f"{text}: one of {_choices(BACKBONES)}"
    elif meta["choices"] and (meta["flag"] is None or meta["flag"].show_choices):
        text = f"{text}: one of {_choices(meta['choices'])}"
    if help_text is None and DEFAULTS[key] is not None and DEFAULTS[key] is not False:
        text = f"{text} {_default(key)}"
    return text.replace("%", "%%")


def _default(key: str) -> str:
    """``(default X)`` from the config defaults; without --config the method's small preset also
    sets some keys, which the help says once at the top."""
    return f"(default {DEFAULTS[key]})"


#: The ``--help`` sections of ``train``, in order.
GROUPS = (WHAT, LABELS, BUDGET, OPTIMISATION, RUNNING)


def add_config_flags(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """One flag per schema key that has a ``Flag`` (``emanorm.train.config.TrainConfig``), in its
    group; keys sharing ``Flag.exclusive`` exclude each other. Returns the argparse groups by name."""
    groups: dict[str, Any] = {name: parser.add_argument_group(name) for name in GROUPS}
    exclusive: dict[str, Any] = {}
    for key, schema_field in FIELDS.items():
        flag = schema_field.metadata["flag"]
        if flag is None:
            continue
        if flag.group not in groups:
            groups[flag.group] = parser.add_argument_group(flag.group)
        group = groups[flag.group]
        if flag.exclusive:
            if flag.exclusive not in exclusive:
                exclusive[flag.exclusive] = group.add_mutually_exclusive_group()
            group = exclusive[flag.exclusive]
        add_schema_flag(group, key)
    return groups


def add_schema_flag(group: Any, key: str, help_text: str | None = None) -> None:
    """The flag of one schema key: name, type, metavar and help from its ``TrainConfig`` field.

    ``help_text`` replaces the field's own text (``compare`` says "of every run"); the allowed
    values are still listed from the schema. The value is checked by the schema afterwards, with
    its error messages (value, allowed values, suggestion), not by argparse.
    """
    flag = FIELDS[key].metadata["flag"]
    name = (flag.name if flag else None) or "--" + key.replace("_", "-")
    kwargs: dict[str, Any] = {"dest": key, "help": _flag_help(key, help_text)}
    if isinstance(DEFAULTS[key], bool):
        kwargs.update(action="store_true", default=None)
    else:
        kwargs.update(type=_flag_type(key), metavar=flag.metavar if flag else None)
    group.add_argument(name, **kwargs)


def _flag_type(key: str) -> type:
    """What argparse converts a flag's text to (the schema checks the value afterwards)."""
    annotation = str(FIELDS[key].type)
    for kind in (int, float):
        if annotation.startswith(kind.__name__):
            return kind
    return str


def add_train_parser(subparsers: Any) -> None:
    p = add_command(subparsers, "train", "train a method (the main job)", TRAIN_HELP)
    groups = add_config_flags(p)
    groups[WHAT].add_argument(
        "--config", help="a preset name (see `emanorm presets`) or a YAML file"
    )
    add_repeatable(
        groups[OPTIMISATION], "--method-arg", "KEY=VALUE",
        "a method option, e.g. threshold=0.95 (repeatable; see docs/methods.md)", type=key_value,
    )
    run = groups[RUNNING]
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
    add_repeatable(
        run, "--set", "KEY=VALUE",
        "override any config key, e.g. --set warmup_epochs=5 (repeatable; `--print-config` lists the keys)",
        type=key_value,
    )
    run.add_argument(
        "--no-progress", action="store_true", help="no progress bar (a line per tenth of the steps instead)"
    )
    run.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit (no training)"
    )
    add_verbose(run, default=argparse.SUPPRESS)
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
    refuse_unused_labels(cfg)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    refuse_resume_of_nothing(cfg, args.resume)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # under torchrun, rank 0 checks under the lock
        check_run_dir_early(cfg, bool(args.resume), args.force)
    refuse_before_loading(cfg, args.resume, args.force)
    # torch loads from here on: every argument and config error above was answered without it
    from emanorm.evaluation.monitor import knn_monitor
    from emanorm.train import train

    summary = train(
        cfg, monitor=knn_monitor, resume=args.resume, force=args.force, progress=not args.no_progress
    )
    if summary.get("run_dir"):
        print(format_report(summary))
    return 0


def refuse_resume_of_nothing(cfg: dict[str, Any], resume: bool | str) -> None:
    """Plain ``--resume`` continues a run: a run directory with no trace of one (a typo,
    another machine's path) is refused instead of trained from scratch; ``--resume auto`` (job
    scripts) still starts a fresh run there."""
    if resume is not True:
        return
    run_dir = Path(cfg["out"] or default_run_dir(cfg))
    traces = (CHECKPOINT_FILE, Path("summary.json"), Path("config.yaml"))  # what a started run leaves
    if not any((run_dir / trace).exists() for trace in traces):
        what = "does not exist" if not run_dir.exists() else "holds no run (no checkpoint, config or summary)"
        raise UserError(
            f"--resume: {run_dir} {what}, so there is no run to continue; leave out --resume to start it, "
            "or use --resume auto (resume when there is a checkpoint, start fresh otherwise)"
        )


def refuse_before_loading(cfg: dict[str, Any], resume: bool | str, force: bool) -> None:
    """Missing data and files and a method's own settings, refused before torch loads with the
    message the trainer would give after loading (same wording, same order: the data, the labeled
    split, the method, the start point): a ``data_dir`` that does not exist (or none, for a
    dataset read from files), a ``label_index_csv`` that does not exist, an unknown method option
    or a norm the method does not allow, an ``init_from`` that does not exist. Only where the
    trainer reads them: ``--resume`` of a finished run reads nothing, and a resumed checkpoint
    replaces ``init_from``. Without a ``data_dir``, Fashion-MNIST looks in its system and cache
    folders (and may download): left to the loader."""
    run_dir = Path(cfg["out"] or default_run_dir(cfg))
    if resume and not force and (run_dir / "summary.json").exists():
        return  # nothing is loaded: the finished run's summary is reported
    data_dir = cfg["data_dir"]
    if data_dir is None and cfg["dataset"] in DATA_DIR_LAYOUTS:  # load_dataset's message
        raise UserError(f"{cfg['dataset']} needs data_dir; expected {DATA_DIR_LAYOUTS[cfg['dataset']]}")
    if data_dir is not None and str(data_dir).strip():
        root = Path(data_dir).expanduser()
        if not root.exists():  # emanorm.data.datasets.load_dataset's message
            message = f"{cfg['dataset']}: data_dir {root} is not a directory (it does not exist)"
            if cfg["dataset"] == "fashion_mnist":
                message += (f"; leave it out to use {FASHION_MNIST_SYSTEM_DIR} "
                            "(`apt-get install dataset-fashion-mnist`)")
            raise UserError(message)
    csv_file = cfg["label_index_csv"]
    if csv_file is not None and not Path(csv_file).exists():  # emanorm.data.splits.read_split_csv's
        raise UserError(f"split CSV {Path(csv_file)} not found")
    refuse_method_settings(cfg)
    resuming = bool(resume) and (run_dir / CHECKPOINT_FILE).exists()
    init_from = cfg["init_from"]
    if init_from and not resuming and not Path(init_from).exists():  # resolve_checkpoint_path's
        raise UserError(f"checkpoint or run directory not found: {Path(init_from)}")


def refuse_method_settings(cfg: dict[str, Any]) -> None:
    """An option the method does not have, or a norm it does not allow, refused from the torch-free
    tables in the words of :class:`emanorm.methods.base.Method` (options first, as it checks)."""
    method, options = cfg["method"], METHOD_OPTIONS[cfg["method"]]
    unknown = sorted(set(cfg["method_args"] or {}) - set(options))
    if unknown:
        allowed = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "none"
        raise UserError(f"unknown option(s) {', '.join(unknown)} for method {method!r}; allowed: {allowed}")
    if cfg["norm"] not in METHOD_NORMS[method]:
        allowed = ", ".join(METHOD_NORMS[method])
        raise UserError(f"norm {cfg['norm']!r} is not valid for method {method!r}; allowed: {allowed}")


def refuse_unused_labels(cfg: dict[str, Any]) -> None:
    """A label flag for a method that trains without labels (MoCo, MoCo v3, BYOL, DINO) would change nothing
    but the recorded split: the kNN monitor's bank is drawn from every labeled training image and
    the linear probe (``emanorm eval linear``, compare) takes its own label flags. Refused."""
    if cfg["method"] in SEMI_SUPERVISED:
        return
    given = [key for key in LABEL_KEYS if cfg.get(key) is not None]
    if given:
        key = given[0]
        raise UserError(
            f"--{key.replace('_', '-')} {cfg[key]}: {cfg['method']} trains without labels, so it would "
            f"change nothing (its kNN monitor uses every labeled training image; give labels to the "
            f"linear probe: emanorm eval linear RUN_DIR --label-fraction F); methods that use labels: "
            f"{', '.join(SEMI_SUPERVISED)}"
        )


def has_teacher(method: str) -> bool:
    """Whether a method trains a separate teacher (the supervised baseline does not)."""
    return method != "supervised"


def trained_images(summary: dict[str, Any]) -> str:
    """What a run trained on: ``100 labeled and 60,000 unlabeled images``, ``100 labeled images``
    (supervised) or ``60,000 unlabeled images`` (self-supervised: no label is used)."""
    method = summary["method"]  # a method of your own (not in the catalog) counts as using labels
    uses_labels = method in SEMI_SUPERVISED or method not in METHOD_NAMES
    # summaries from before "unlabeled" was recorded: a self-supervised run trained on all its images
    unlabeled = summary.get("unlabeled", 0 if uses_labels else summary["labeled"])
    if not uses_labels:
        return f"{unlabeled:,} unlabeled images"
    if unlabeled:
        return f"{summary['labeled']:,} labeled and {unlabeled:,} unlabeled images"
    return f"{summary['labeled']:,} labeled images"


def format_report(summary: dict[str, Any]) -> str:
    """The lines ``emanorm train`` ends with: accuracies (percent), the kNN protocol, threads."""
    final = summary.get("final", {})
    environment = summary.get("environment") or {}
    threads = f", {environment['threads']} CPU thread(s)" if "threads" in environment else ""
    lines = [
        f"\n{summary['method']} with norm={summary['norm']} on {summary['dataset']}: "
        f"{summary['steps']} steps, {trained_images(summary)}, "
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
