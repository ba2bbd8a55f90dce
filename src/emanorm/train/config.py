"""Run configuration: one typed schema, YAML presets, command-line overrides, validation.

:class:`TrainConfig` is the single source of truth for every config key: its type (the
annotation), default, allowed values, bounds, help text, whether it is an ``emanorm train`` flag
and whether it can change the trained weights. Everything else derives from it: ``DEFAULTS`` and
``CHOICES``, the ``train`` flags and their ``--help`` (``emanorm.cli.train``), what ``--set`` and
a preset may name, the checks of :func:`validate_config`, and what :func:`comparable` compares
when a run is resumed.

It is written with stdlib :mod:`dataclasses` (a field's ``metadata`` holds its help, choices and
bounds; the generic pieces, ``option``, ``Bounds``, ``Flag`` and the check of one value, are in
:mod:`emanorm.train.schema`) rather than pydantic or OmegaConf, which the project's GPU image
does not ship; and it imports neither torch nor the registries (the torch-free names are in
:mod:`emanorm.catalog`), so the command line checks a config before torch loads.

A resolved config stays a flat dict of plain values (plus ``method_args``, the method's own
options), so it reads well in ``config.yaml`` and loads safely anywhere; ``TrainConfig(**cfg)``
is its typed view.

Adding a key is one change here: a field of :class:`TrainConfig`, in the place ``config.yaml``
should list it, e.g. ::

    calibrate_bn_batches: int = option(
        0, "BatchNorm statistics from N training batches before step 0 (0: off)",
        bounds=NON_NEGATIVE, flag=Flag(OPTIMISATION, name="--calibrate-bn", metavar="N"),
    )

``bounds``, ``choices`` and the annotation are checked; ``flag`` makes it an ``emanorm train``
flag (``--calibrate-bn``; without ``name``: ``--calibrate-bn-batches``); ``affects_weights=False``
lets ``--resume`` accept a change of it (monitoring, logging, where or how fast a run goes). An
older run's ``config.yaml`` without the key reads as the default. A rule between keys goes into
:func:`_check_together`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import yaml

from emanorm.catalog import (
    ALL_NORMS,
    AUGMENT_OPTIONS,
    BACKBONES,
    DATASETS,
    LOGGERS,
    METHOD_NAMES,
    METHOD_OPTION_RANGES,
)
from emanorm.catalog import SEMI_SUPERVISED as SEMI_SUPERVISED_METHODS
from emanorm.errors import UserError
from emanorm.train.presets import load_config_source, preset_names
from emanorm.train.schema import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    UNIT,
    Bounds,
    Flag,
    check_field,
    field_types,
    number,
    option,
    suggestion,
)

log = logging.getLogger("emanorm")

#: The registries' names (``emanorm.catalog``, tied to ``emanorm.methods.METHODS`` by a test).
METHODS: tuple[str, ...] = METHOD_NAMES
NORMS: tuple[str, ...] = ALL_NORMS
SEMI_SUPERVISED: tuple[str, ...] = SEMI_SUPERVISED_METHODS


WHAT = "what to train"
LABELS = "labels (semi-supervised methods)"
BUDGET = "budget"
OPTIMISATION = "optimisation and teacher"
RUNNING = "running"


# -- the schema ----------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Every key of a run's config, in ``config.yaml``'s order. See the module docstring."""

    # what to train
    method: str = option("fixmatch", "the method", choices=METHODS, flag=Flag(WHAT))
    norm: str = option(
        "eman", "the normalization plan of student and teacher (docs/methods.md); eman, teacher_pn and "
        "student_pn change only BatchNorm: on a BatchNorm-free backbone (ViT) they act on the heads' "
        "BatchNorm only (byol, mocov3)", choices=NORMS,
        flag=Flag(WHAT),
    )
    dataset: str = option("fashion_mnist", "the dataset", choices=DATASETS, flag=Flag(WHAT))
    data_dir: str | None = option(
        None, "where the dataset lives (standard layouts; see docs/data.md)", flag=Flag(WHAT)
    )
    backbone: str = option("small", "the backbone", flag=Flag(WHAT))
    image_size: int | None = option(None, "resize file datasets to this side (default: the dataset's)",
                                    bounds=POSITIVE)
    on_corrupt: str = option("error", "an undecodable image: stop, or skip it with a warning",
                             choices=("error", "skip"))
    augment_options: dict[str, Any] = option(  # noqa: RUF009 (a default_factory)
        {}, f"augmentation options: {', '.join(AUGMENT_OPTIONS)} (e.g. {{blur: true}})"
    )
    init_from: str | None = option(
        None, "start the backbone from a run directory or checkpoint", flag=Flag(RUNNING)
    )
    init_which: str = option(
        "teacher", "which network of --init-from", choices=("teacher", "student"), flag=Flag(RUNNING)
    )
    # labels (semi-supervised methods)
    labels_per_class: int | None = option(
        None, "labeled images per class", bounds=POSITIVE, flag=Flag(LABELS, exclusive="labels")
    )
    label_fraction: float | None = option(
        None, "fraction of labels per class, e.g. 0.01 or 0.1", bounds=FRACTION,
        flag=Flag(LABELS, exclusive="labels"),
    )
    label_index_csv: str | None = option(
        None, "a CSV with column Index (the paper's ImageNet 1%/10% files)",
        flag=Flag(LABELS, exclusive="labels"),
    )
    # budget
    epochs: int | None = option(
        None, "passes over the (unlabeled) training set", bounds=POSITIVE,
        flag=Flag(BUDGET, exclusive="budget"),
    )
    max_steps: int | None = option(
        None, "optimizer steps", bounds=POSITIVE, flag=Flag(BUDGET, exclusive="budget")
    )
    batch_size: int = option(
        64, "global batch (labeled batch for semi-supervised methods)", bounds=POSITIVE,
        flag=Flag(OPTIMISATION),
    )
    unlabeled_ratio: int = option(
        7, "unlabeled batch = ratio x batch size (FixMatch's mu)", bounds=POSITIVE, flag=Flag(OPTIMISATION)
    )
    accumulate: int = option(
        1, "gradient accumulation: split each batch into N micro-batches (batch-size / N per process "
        "each) and step once; same schedule, less memory", bounds=POSITIVE,
        flag=Flag(OPTIMISATION, metavar="N"),
    )
    # optimisation
    optimizer: str = option("sgd", "the optimizer", choices=("sgd", "lars", "adamw"), flag=Flag(OPTIMISATION))
    lr: float = option(0.03, "initial learning rate", bounds=POSITIVE, flag=Flag(OPTIMISATION))
    weight_decay: float = option(5e-4, "weight decay", bounds=NON_NEGATIVE)
    sgd_momentum: float = option(0.9, "SGD / LARS momentum", bounds=UNIT)
    nesterov: bool = option(True, "Nesterov momentum (SGD)")
    lars_eta: float = option(0.001, "LARS trust coefficient", bounds=POSITIVE)
    schedule: str = option("cosine", "learning-rate schedule", choices=("cosine", "step", "constant"))
    lr_milestones: list[float] = option(  # noqa: RUF009 (a default_factory)
        [0.6, 0.8], "fractions of training where the step schedule divides the lr by 10"
    )
    warmup_epochs: float = option(0.0, "linear learning-rate warm-up", bounds=NON_NEGATIVE)
    # DINO's recipe (main_dino.py); the defaults keep the schedules above unchanged
    warmup_from_zero: bool = option(
        False, "warm the lr up as linspace(0, lr) over the warm-up (DINO) instead of from lr / W"
    )
    min_lr: float = option(0.0, "the cosine schedule ends at this lr (DINO's min_lr; at most lr)",
                           bounds=NON_NEGATIVE)
    weight_decay_end: float | None = option(
        None, "weight decay follows a cosine from weight_decay to this (DINO); null: constant",
        bounds=NON_NEGATIVE,
    )
    # teacher
    ema_momentum: float = option(
        0.999, "teacher parameter momentum m of Eq. 1", bounds=UNIT, flag=Flag(OPTIMISATION)
    )
    eman_momentum: float | None = option(
        None, "EMAN statistics momentum of Eq. 9 (Table 8); default: = m", bounds=UNIT,
        flag=Flag(OPTIMISATION),
    )
    bn_momentum: float = option(
        0.1, "PyTorch BN momentum for statistics a teacher collects itself", bounds=UNIT,
        flag=Flag(OPTIMISATION),
    )
    bn_splits: int = option(
        1, "BatchNorm statistics per split of each process's batch, e.g. 8: the paper's per-GPU BN "
        "on one process", bounds=POSITIVE, flag=Flag(OPTIMISATION),
    )
    calibrate_bn_batches: int = option(
        0, "before step 0, set the student's BatchNorm statistics from N training batches (cumulative "
        "average, no gradient) and start the teacher from them: an EMAN / PN teacher then does not "
        "start from mean 0 / variance 1 (0: off, the paper's start and the ImageNet presets'; 20 in the "
        "small FixMatch, MoCo v2, BYOL and DINO presets; docs/methods.md)",
        bounds=NON_NEGATIVE, flag=Flag(OPTIMISATION, name="--calibrate-bn", metavar="N"),
    )
    method_args: dict[str, Any] = option(  # noqa: RUF009 (a default_factory)
        {}, "the method's own options (--method-arg; docs/methods.md)"
    )
    # monitoring: reads the networks, changes no weight
    log_every: int = option(20, "log the losses every N steps", bounds=POSITIVE, affects_weights=False)
    logger: str = option(
        "jsonl,tensorboard", "comma list of jsonl, tensorboard, mlflow, wandb (metrics.jsonl is always "
        "written). mlflow: RUN_DIR/mlruns or $MLFLOW_TRACKING_URI (pip install 'emanorm[mlflow]'); "
        "wandb: offline under RUN_DIR/wandb without $WANDB_API_KEY ('emanorm[wandb]')",
        flag=Flag(RUNNING, metavar="LIST"), affects_weights=False,
    )
    eval_every: int = option(
        1, "kNN / test-accuracy monitor every N epochs (0: only at the end)", bounds=NON_NEGATIVE,
        flag=Flag(RUNNING), affects_weights=False,
    )
    knn_k: int = option(20, "neighbours of the kNN monitor", bounds=POSITIVE, affects_weights=False)
    knn_bank_size: int = option(
        10000, "labeled training images in the kNN monitor's bank", bounds=POSITIVE, affects_weights=False
    )
    monitor_test_size: int | None = option(
        None, "test images of the monitor (default: all)", bounds=POSITIVE, affects_weights=False
    )
    eval_light_size: int | None = option(
        None, "a lighter kNN bank for the evaluations along training", bounds=POSITIVE, affects_weights=False
    )
    # machinery
    seed: int = option(0, "seed of the labeled split, weights and batches", bounds=NON_NEGATIVE,
                       flag=Flag(RUNNING))
    device: str = option(
        "auto", "where to train", choices=("auto", "cpu", "cuda"), flag=Flag(RUNNING), affects_weights=False
    )
    amp: str = option(
        "auto", "autocast (auto: bf16 on GPU, off on CPU; fp16 needs CUDA)",
        choices=("auto", "bf16", "fp16", "off"), flag=Flag(RUNNING),
    )
    channels_last: str | bool = option("auto", "channels-last memory format", choices=("auto", True, False))
    compile: bool = option(
        False, "torch.compile the training step", flag=Flag(RUNNING), affects_weights=False
    )
    num_workers: int = option(
        0, "data loader workers (file datasets)", bounds=NON_NEGATIVE, flag=Flag(RUNNING),
        affects_weights=False,
    )
    loader_timeout: float = option(
        300, "seconds a data loader worker may take for a batch", bounds=POSITIVE, affects_weights=False
    )
    checkpoint_every_steps: int = option(
        0, "also checkpoint every N steps (0: per epoch)", bounds=NON_NEGATIVE, flag=Flag(RUNNING),
        affects_weights=False,
    )
    deterministic: bool = option(False, "deterministic algorithms (slower)")
    out: str | None = option(
        None, "run directory (default runs/<method>-<norm>-<dataset>-s<seed>, plus -from-<source run> "
        "with --init-from)", flag=Flag(RUNNING),
        affects_weights=False,
    )


#: What a resolved config holds beyond the schema: where it came from (a preset name or file).
PROVENANCE_KEYS: tuple[str, ...] = ("preset",)
FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
DEFAULTS: dict[str, Any] = dataclasses.asdict(TrainConfig())
CHOICES: dict[str, tuple[Any, ...]] = {
    k: f.metadata["choices"] for k, f in FIELDS.items() if f.metadata["choices"]
}
#: Keys that cannot change the trained weights: ``--resume`` accepts a change of them.
NOT_AFFECTING_WEIGHTS: frozenset[str] = frozenset(
    [*(k for k, f in FIELDS.items() if not f.metadata["affects_weights"]), *PROVENANCE_KEYS]
)
LABEL_KEYS = ("labels_per_class", "label_fraction", "label_index_csv")


# -- resolving -------------------------------------------------------------------------------------
def resolve_config(
    config: str | None = None,
    overrides: dict[str, Any] | None = None,
    method: str | None = None,
    *,
    explicit: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Defaults, then the preset or file (``small-<method>`` when none is named), then overrides.

    ``overrides`` that are None are ignored (a flag not given); ``explicit`` values are applied as
    they are, None included (``--set labels_per_class=null`` clears the preset's value).
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key, value in (explicit or {}).items():
        if key == "method_args" and isinstance(value, dict):
            overrides["method_args"] = {**overrides.get("method_args", {}), **value}
        else:
            overrides[key] = value
    chosen_method = overrides.get("method", method)
    if config is None:
        candidate = f"small-{chosen_method or DEFAULTS['method']}"
        config = candidate if candidate in preset_names() else None
    cfg = copy.deepcopy(DEFAULTS)
    if config is not None:
        source = load_config_source(config)
        source.pop("description", None)
        _check_keys(source, f"config {config}")
        cfg.update(source)
        cfg["preset"] = config
    else:
        cfg["preset"] = None
    _check_keys(overrides, "command line")
    method_args = overrides.pop("method_args", None)
    cfg.update(overrides)
    if isinstance(method_args, dict) and isinstance(cfg.get("method_args") or {}, dict):
        cfg["method_args"] = {**(cfg.get("method_args") or {}), **method_args}
    elif method_args is not None:
        cfg["method_args"] = method_args  # not a mapping: validate_config says so
    # budget flags replace each other: --epochs on the command line drops the preset's max_steps
    if "epochs" in overrides and "max_steps" not in overrides:
        cfg["max_steps"] = None
    if "max_steps" in overrides and "epochs" not in overrides:
        cfg["epochs"] = None
    # one way to pick labels: the one named on the command line replaces the preset's
    if any(overrides.get(k) is not None for k in LABEL_KEYS):
        for key in LABEL_KEYS:
            if key not in overrides:
                cfg[key] = None
    validate_config(cfg)
    if cfg["preset"] and "from-moco" in cfg["preset"] and not cfg["init_from"]:
        log.warning("preset %s expects --init-from a MoCo run; without it this trains from scratch", config)
    return cfg


def _check_keys(source: dict[str, Any], where: str) -> None:
    unknown = sorted(set(source) - set(DEFAULTS) - set(PROVENANCE_KEYS))
    if unknown:
        hint = suggestion(unknown[0], DEFAULTS) if len(unknown) == 1 else ""
        raise UserError(
            f"unknown option(s) in {where}: {', '.join(unknown)}{hint}; allowed: {', '.join(DEFAULTS)}"
        )


# -- validation ------------------------------------------------------------------------------------
def validate_config(cfg: dict[str, Any]) -> None:
    """Check every key against the schema, then the rules between keys; raise UserError naming the
    first bad value and what is allowed. Values are normalised in place (``2.0`` -> ``2`` for an
    integer key, the logger list)."""
    cfg["logger"] = check_loggers(cfg["logger"])  # a list or null is accepted: normalised first
    admitted = field_types(TrainConfig)
    for key, schema_field in FIELDS.items():
        cfg[key] = check_field(key, cfg[key], schema_field, admitted[key])
    _check_backbone(cfg["backbone"])
    _check_augment_options(cfg["augment_options"])
    _check_lr_milestones(cfg["lr_milestones"])
    _check_together(cfg)
    check_feasible(cfg)


def _check_backbone(name: str) -> None:
    """A named backbone, or ``timm:`` / ``torchvision:`` and a model name (checked when it is built)."""
    named = [b for b in BACKBONES if not b.endswith("<name>")]
    prefix, _, model = name.partition(":")
    if name not in named and not (prefix in ("timm", "torchvision") and model.strip()):
        allowed = ", ".join(BACKBONES)
        raise UserError(f"unknown backbone {name!r}{suggestion(name, named)}; allowed: {allowed}")


def _check_augment_options(options: dict[str, Any]) -> None:
    for key, value in options.items():
        if key not in AUGMENT_OPTIONS:
            raise UserError(
                f"unknown augment option {key!r}{suggestion(key, AUGMENT_OPTIONS)}; "
                f"allowed: {', '.join(AUGMENT_OPTIONS)}"
            )
        if value is None:
            continue
        if AUGMENT_OPTIONS[key] == "bool" and not isinstance(value, bool):
            raise UserError(f"augment option {key} must be true or false, got {value!r}")
        if AUGMENT_OPTIONS[key] in ("float", "int") and not (number(value) and math.isfinite(value)):
            raise UserError(f"augment option {key} must be a number, got {value!r}")


def _check_lr_milestones(milestones: Any) -> None:
    if not isinstance(milestones, list) or not all(number(m) and 0 < m < 1 for m in milestones):
        raise UserError(
            f"lr_milestones must be a list of fractions of training in (0, 1), e.g. [0.6, 0.8]; "
            f"got {milestones!r}"
        )


def _check_together(cfg: dict[str, Any]) -> None:
    """The rules between keys."""
    chosen = [k for k in LABEL_KEYS if cfg[k] is not None]
    if len(chosen) > 1:
        raise UserError(f"choose one way to pick labels, got {', '.join(chosen)}")
    if cfg["epochs"] is not None and cfg["max_steps"] is not None:
        raise UserError("choose --epochs or --max-steps, not both")
    if cfg["epochs"] is None and cfg["max_steps"] is None:
        raise UserError("set a budget: --epochs E or --max-steps S")
    if cfg["batch_size"] % cfg["accumulate"]:
        raise UserError(
            f"batch_size {cfg['batch_size']} must be divisible by accumulate {cfg['accumulate']} "
            "(the batch is split into that many micro-batches)"
        )
    if cfg["optimizer"] == "sgd" and cfg["nesterov"] and cfg["sgd_momentum"] == 0:
        raise UserError("nesterov needs sgd_momentum > 0; set nesterov=false or a momentum such as 0.9")
    if cfg["min_lr"] > cfg["lr"]:
        raise UserError(f"min_lr must be a number in [0, lr={cfg['lr']}], got {cfg['min_lr']!r}")
    for key in ("lr", "weight_decay", "weight_decay_end"):
        if cfg[key] is not None and cfg[key] > 1e6:
            raise UserError(f"{key} {cfg[key]!r} is far too large (above 1e6): check the value")


def check_feasible(cfg: dict[str, Any], world_size: int = 1) -> None:
    """Refuse what the config makes impossible, before anything is built (issue 30, item 5).

    - the batch splits evenly into processes x accumulate micro-batches x bn_splits BN groups
      (``world_size``: the process count, known to the recipe; 1 while the config is resolved);
    - every numeric method option is finite and inside its range in
      :data:`emanorm.catalog.METHOD_OPTION_RANGES` (DINO's ``center_momentum`` in [0, 1],
      ``local_crops`` in [0, 64]).
    """
    accumulate, splits = cfg.get("accumulate", 1), cfg.get("bn_splits", 1)
    parts = world_size * accumulate * splits
    if cfg["batch_size"] % parts:
        raise UserError(
            f"batch_size {cfg['batch_size']} must be divisible by processes x accumulate x bn_splits "
            f"({world_size} x {accumulate} x {splits} = {parts}): every micro-batch is split into "
            "bn_splits equal BatchNorm groups"
        )
    ranges = METHOD_OPTION_RANGES.get(cfg["method"], {})
    for key, value in (cfg.get("method_args") or {}).items():
        if not number(value):
            continue  # types and unknown names: the method's own check names them
        if not math.isfinite(value):
            raise UserError(f"method_args.{key} of {cfg['method']} must be a finite number, got {value!r}")
        low, high = ranges.get(key, (-math.inf, math.inf))
        if not low <= value <= high:
            raise UserError(
                f"method_args.{key} of {cfg['method']} must lie in [{low}, {high}], got {value!r}"
            )


def check_loggers(value: Any) -> str:
    """``--logger`` as a normalised comma list of known loggers (``""``: none)."""
    if isinstance(value, list | tuple):
        value = ",".join(str(v) for v in value)
    if value is None or value is False:
        value = ""
    if not isinstance(value, str):
        raise UserError(f"logger must be a comma list of {', '.join(LOGGERS)}, got {value!r}")
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in LOGGERS]
    if unknown:
        raise UserError(
            f"unknown logger {unknown[0]!r}{suggestion(unknown[0], LOGGERS)}; "
            f"allowed: {', '.join(LOGGERS)} (a comma list)"
        )
    return ",".join(dict.fromkeys(names))


# -- writing and comparing -------------------------------------------------------------------------
def dump_config(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)


def comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of a config that must match for ``--resume``: the keys that can change the trained
    weights (``affects_weights`` in the schema). A key added after a run was written counts as its
    default, and a key a later version dropped is not compared, so old runs stay resumable."""
    full = {**DEFAULTS, **cfg}
    return {k: full[k] for k in DEFAULTS if k not in NOT_AFFECTING_WEIGHTS}


#: Keys that act only before step 0: a resumed run keeps the value it started with
#: (:func:`keep_recorded_start`), so a preset that changed them later does not block ``--resume``.
START_ONLY_KEYS: tuple[str, ...] = ("calibrate_bn_batches",)


def keep_recorded_start(recorded: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """Give ``cfg`` the start-only settings (:data:`START_ONLY_KEYS`) a resumed run was started
    with (a key it predates counts as its default); returns ``"key stays old (asked: new)"`` for
    each one that differed, for the log."""
    kept = []
    for key in START_ONLY_KEYS:
        old = recorded.get(key, DEFAULTS[key])
        if cfg.get(key, DEFAULTS[key]) != old:
            kept.append(f"{key} stays {old!r} (asked: {cfg.get(key)!r})")
        cfg[key] = old
    return kept


def config_changes(old_cfg: dict[str, Any], new_cfg: dict[str, Any], limit: int = 5) -> str | None:
    """What ``--resume`` refuses without ``--force``: ``"key: old -> new"`` for (up to ``limit`` of)
    the keys whose change alters the run (:func:`comparable`); None when nothing does. The one diff
    behind the refusals: the run directory's config.yaml, the checkpoint's own config, and
    ``emanorm compare``'s runs already in its ``--out``.
    Start-only keys are not compared: a resumed run keeps its own (:func:`keep_recorded_start`)."""
    old, new = comparable(old_cfg), comparable(new_cfg)
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in START_ONLY_KEYS)
    if not differ:
        return None
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:limit])


__all__ = [
    "BACKBONES",
    "CHOICES",
    "DEFAULTS",
    "FIELDS",
    "LOGGERS",
    "METHODS",
    "NORMS",
    "SEMI_SUPERVISED",
    "START_ONLY_KEYS",
    "Bounds",
    "Flag",
    "TrainConfig",
    "check_loggers",
    "comparable",
    "config_changes",
    "dump_config",
    "keep_recorded_start",
    "load_config_source",
    "preset_names",
    "resolve_config",
    "validate_config",
]
