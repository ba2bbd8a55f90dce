"""Run configuration: defaults, YAML presets, command-line overrides, validation.

A config is a flat dict of plain values (plus ``method_args``, the method's own options), so
it reads well in ``config.yaml`` and loads safely anywhere.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from emanorm.data import build_augmentation
from emanorm.errors import UserError
from emanorm.methods import ALL_NORMS
from emanorm.methods import METHODS as METHOD_CLASSES
from emanorm.methods import SEMI_SUPERVISED as SEMI_SUPERVISED_METHODS

log = logging.getLogger("emanorm")

#: The registries, derived from the method classes (``emanorm.methods.METHODS``).
METHODS: tuple[str, ...] = tuple(METHOD_CLASSES)
NORMS: tuple[str, ...] = ALL_NORMS
SEMI_SUPERVISED: tuple[str, ...] = SEMI_SUPERVISED_METHODS

DEFAULTS: dict[str, Any] = {
    # what to train
    "method": "fixmatch",
    "norm": "eman",
    "dataset": "fashion_mnist",
    "data_dir": None,
    "backbone": "small",
    "image_size": None,
    "on_corrupt": "error",
    "augment_options": {},
    "init_from": None,
    "init_which": "teacher",
    # labels (semi-supervised methods)
    "labels_per_class": None,
    "label_fraction": None,
    "label_index_csv": None,
    # budget
    "epochs": None,
    "max_steps": None,
    "batch_size": 64,
    "unlabeled_ratio": 7,
    "accumulate": 1,
    # optimisation
    "optimizer": "sgd",
    "lr": 0.03,
    "weight_decay": 5e-4,
    "sgd_momentum": 0.9,
    "nesterov": True,
    "lars_eta": 0.001,
    "schedule": "cosine",
    "lr_milestones": [0.6, 0.8],
    "warmup_epochs": 0.0,
    # teacher
    "ema_momentum": 0.999,
    "eman_momentum": None,
    "bn_momentum": 0.1,
    # BatchNorm statistics per split of each rank's batch (1: whole batch; 8 on one process: the
    # paper's per-GPU BN of its 8-GPU runs)
    "bn_splits": 1,
    # BN statistics from this many training batches before step 0 (0: off, the paper's start);
    # the teacher starts from them instead of mean 0 / variance 1 (emanorm.calibrate_batchnorm)
    "calibrate_bn_batches": 0,
    "method_args": {},
    # monitoring
    "log_every": 20,
    "logger": "jsonl,tensorboard",
    "eval_every": 1,
    "knn_k": 20,
    "knn_bank_size": 10000,
    "monitor_test_size": None,
    "eval_light_size": None,
    # machinery
    "seed": 0,
    "device": "auto",
    "amp": "auto",
    "channels_last": "auto",
    "compile": False,
    "num_workers": 0,
    "loader_timeout": 300,
    "checkpoint_every_steps": 0,
    "deterministic": False,
    "out": None,
}

#: What ``--logger`` may list (see ``emanorm.train.tracking``).
LOGGERS: tuple[str, ...] = ("jsonl", "tensorboard", "mlflow", "wandb")

CHOICES: dict[str, tuple[Any, ...]] = {
    "method": METHODS,
    "norm": NORMS,
    "optimizer": ("sgd", "lars", "adamw"),
    "schedule": ("cosine", "step", "constant"),
    "device": ("auto", "cpu", "cuda"),
    "amp": ("auto", "bf16", "fp16", "off"),
    "channels_last": ("auto", True, False),
    "init_which": ("teacher", "student"),
    "on_corrupt": ("error", "skip"),
}


def preset_names() -> list[str]:
    folder = resources.files("emanorm") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise UserError(f"invalid YAML in {where}: nested too deeply") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"invalid YAML in {where}{line}: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{where} must hold a YAML mapping of options, got {type(data).__name__}")
    return data


def load_config_source(name_or_path: str) -> dict[str, Any]:
    """A preset by name (``small-fixmatch``) or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"config file {path} is not YAML text (byte {err.start} is not UTF-8)") from None
        except OSError as err:
            raise UserError(f"cannot read config file {path}: {err.strerror or err}") from None
        return _read_yaml(text, str(path))
    names = preset_names()
    if name_or_path not in names:
        raise UserError(f"unknown preset {name_or_path!r}; presets: {', '.join(names)} (or a .yaml path)")
    text = (resources.files("emanorm") / "configs" / f"{name_or_path}.yaml").read_text()
    return _read_yaml(text, f"preset {name_or_path}")


LABEL_KEYS = ("labels_per_class", "label_fraction", "label_index_csv")


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
    if method_args:
        cfg["method_args"] = {**(cfg.get("method_args") or {}), **method_args}
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
    unknown = sorted(set(source) - set(DEFAULTS) - {"preset"})
    if unknown:
        raise UserError(f"unknown option(s) in {where}: {', '.join(unknown)}; allowed: {', '.join(DEFAULTS)}")


def _positive(cfg: dict[str, Any], key: str, kind: type = int, allow_none: bool = True) -> None:
    value = cfg[key]
    if value is None and allow_none:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and int(value) != value)
    ):
        raise UserError(f"{key} must be a positive {kind.__name__}, got {value!r}")
    if value <= 0:
        raise UserError(f"{key} must be positive, got {value!r}")
    cfg[key] = kind(value)


BOOLEANS = ("compile", "nesterov", "deterministic")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _augment_option_kinds() -> dict[str, str]:
    """``build_augmentation``'s keyword options and their annotations (the allowed augment_options)."""
    params = inspect.signature(build_augmentation).parameters.values()
    return {p.name: str(p.annotation) for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _check_augment_options(options: dict[str, Any]) -> None:
    kinds = _augment_option_kinds()
    for key, value in options.items():
        if key not in kinds:
            raise UserError(f"unknown augment option {key!r}; allowed: {', '.join(kinds)}")
        if value is None:
            continue
        if kinds[key].startswith("bool") and not isinstance(value, bool):
            raise UserError(f"augment option {key} must be true or false, got {value!r}")
        if kinds[key].startswith(("float", "int")) and not (_number(value) and math.isfinite(value)):
            raise UserError(f"augment option {key} must be a number, got {value!r}")


def validate_config(cfg: dict[str, Any]) -> None:
    """Raise UserError naming the first bad value and what is allowed."""
    for key, allowed in CHOICES.items():
        if cfg[key] not in allowed:
            shown = ", ".join(str(a) for a in allowed)
            raise UserError(f"unknown {key} {cfg[key]!r}; allowed: {shown}")
    for key in BOOLEANS:
        if not isinstance(cfg[key], bool):
            raise UserError(f"{key} must be true or false, got {cfg[key]!r}")
    for key, value in cfg.items():  # nan / inf anywhere fail at step 0 otherwise
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{key} must be a finite number, got {value!r}")
    for key in ("epochs", "max_steps", "batch_size", "unlabeled_ratio", "labels_per_class"):
        _positive(cfg, key)
    _positive(cfg, "bn_splits", allow_none=False)
    calibrate = cfg["calibrate_bn_batches"]
    if isinstance(calibrate, bool) or not isinstance(calibrate, int) or calibrate < 0:
        raise UserError(f"calibrate_bn_batches must be an integer >= 0 (0: off), got {calibrate!r}")
    for key in ("log_every", "knn_k", "knn_bank_size", "accumulate"):
        _positive(cfg, key, allow_none=False)
    _positive(cfg, "monitor_test_size")
    _positive(cfg, "eval_light_size")
    _positive(cfg, "image_size")
    _positive(cfg, "loader_timeout", float, allow_none=False)
    if not isinstance(cfg["augment_options"], dict):
        raise UserError(
            f"augment_options must be a mapping (e.g. {{blur: true}}), got {cfg['augment_options']!r}"
        )
    _check_augment_options(cfg["augment_options"])
    _positive(cfg, "lr", float, allow_none=False)
    for key in ("eval_every", "num_workers", "checkpoint_every_steps", "warmup_epochs", "weight_decay"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise UserError(f"{key} must be a number >= 0, got {value!r}")
    for key in ("ema_momentum", "eman_momentum", "bn_momentum", "sgd_momentum"):
        value = cfg[key]
        if value is None and key == "eman_momentum":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise UserError(f"{key} must lie in [0, 1], got {value!r}")
    fraction = cfg["label_fraction"]
    if fraction is not None and (
        isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1
    ):
        raise UserError(f"label_fraction must lie in (0, 1], got {fraction!r}")
    chosen = [k for k in ("labels_per_class", "label_fraction", "label_index_csv") if cfg[k] is not None]
    if len(chosen) > 1:
        raise UserError(f"choose one way to pick labels, got {', '.join(chosen)}")
    if cfg["epochs"] is not None and cfg["max_steps"] is not None:
        raise UserError("choose --epochs or --max-steps, not both")
    if cfg["epochs"] is None and cfg["max_steps"] is None:
        raise UserError("set a budget: --epochs E or --max-steps S")
    if not isinstance(cfg["method_args"], dict):
        raise UserError(f"method_args must be a mapping, got {cfg['method_args']!r}")
    if cfg["batch_size"] % cfg["accumulate"]:
        raise UserError(
            f"batch_size {cfg['batch_size']} must be divisible by accumulate {cfg['accumulate']} "
            "(the batch is split into that many micro-batches)"
        )
    cfg["logger"] = check_loggers(cfg["logger"])
    if not isinstance(cfg["seed"], int) or isinstance(cfg["seed"], bool) or cfg["seed"] < 0:
        raise UserError(f"seed must be an integer >= 0, got {cfg['seed']!r}")
    milestones = cfg["lr_milestones"]
    if not isinstance(milestones, list) or not all(_number(m) and 0 < m < 1 for m in milestones):
        raise UserError(
            f"lr_milestones must be a list of fractions of training in (0, 1), e.g. [0.6, 0.8]; "
            f"got {milestones!r}"
        )
    if cfg["optimizer"] == "sgd" and cfg["nesterov"] and cfg["sgd_momentum"] == 0:
        raise UserError("nesterov needs sgd_momentum > 0; set nesterov=false or a momentum such as 0.9")
    if not (_number(cfg["lars_eta"]) and cfg["lars_eta"] > 0):
        raise UserError(f"lars_eta must be a positive number, got {cfg['lars_eta']!r}")
    for key in ("lr", "weight_decay"):
        if cfg[key] > 1e6:
            raise UserError(f"{key} {cfg[key]!r} is far too large (above 1e6): check the value")


def dump_config(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)


#: Keys added after runs were first written: a config.yaml without one held its default.
ADDED_KEYS: dict[str, Any] = {"accumulate": 1}


def comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of a config that must match for ``--resume`` (not where or how it runs)."""
    # evaluation along training reads the networks and changes no weight
    ignored = {
        "out", "device", "num_workers", "log_every", "logger", "compile", "preset", "eval_every",
        "eval_light_size",
    }
    # a key added after the run was written counts as its default (old runs stay resumable)
    return {k: v for k, v in {**DEFAULTS, **cfg}.items() if k not in ignored}


def check_loggers(value: Any) -> str:
    """``--logger`` as a normalised comma list of known loggers (``""``: none)."""
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    if value is None or value is False:
        value = ""
    if not isinstance(value, str):
        raise UserError(f"logger must be a comma list of {', '.join(LOGGERS)}, got {value!r}")
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in LOGGERS]
    if unknown:
        raise UserError(f"unknown logger {unknown[0]!r}; allowed: {', '.join(LOGGERS)} (a comma list)")
    return ",".join(dict.fromkeys(names))
