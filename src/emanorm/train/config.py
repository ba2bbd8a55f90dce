"""Run configuration: defaults, YAML presets, command-line overrides, validation.

A config is a flat dict of plain values (plus ``method_args``, the method's own options), so
it reads well in ``config.yaml`` and loads safely anywhere.
"""

from __future__ import annotations

import copy
import logging
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

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
    "method_args": {},
    # monitoring
    "log_every": 20,
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
        return _read_yaml(path.read_text(), str(path))
    names = preset_names()
    if name_or_path not in names:
        raise UserError(f"unknown preset {name_or_path!r}; presets: {', '.join(names)} (or a .yaml path)")
    text = (resources.files("emanorm") / "configs" / f"{name_or_path}.yaml").read_text()
    return _read_yaml(text, f"preset {name_or_path}")


def resolve_config(
    config: str | None = None, overrides: dict[str, Any] | None = None, method: str | None = None
) -> dict[str, Any]:
    """Defaults, then the preset or file (``small-<method>`` when none is named), then overrides."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
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
    if "label_fraction" in overrides and "labels_per_class" not in overrides:
        cfg["labels_per_class"] = None
    if "labels_per_class" in overrides and "label_fraction" not in overrides:
        cfg["label_fraction"] = None
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


def validate_config(cfg: dict[str, Any]) -> None:
    """Raise UserError naming the first bad value and what is allowed."""
    for key, allowed in CHOICES.items():
        if cfg[key] not in allowed:
            shown = ", ".join(str(a) for a in allowed)
            raise UserError(f"unknown {key} {cfg[key]!r}; allowed: {shown}")
    for key in ("epochs", "max_steps", "batch_size", "unlabeled_ratio", "labels_per_class"):
        _positive(cfg, key)
    for key in ("log_every", "knn_k", "knn_bank_size"):
        _positive(cfg, key, allow_none=False)
    _positive(cfg, "monitor_test_size")
    _positive(cfg, "eval_light_size")
    _positive(cfg, "image_size")
    _positive(cfg, "loader_timeout", float, allow_none=False)
    if not isinstance(cfg["augment_options"], dict):
        raise UserError(
            f"augment_options must be a mapping (e.g. {{blur: true}}), got {cfg['augment_options']!r}"
        )
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
    if not isinstance(cfg["seed"], int) or isinstance(cfg["seed"], bool) or cfg["seed"] < 0:
        raise UserError(f"seed must be an integer >= 0, got {cfg['seed']!r}")


def dump_config(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)


def comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of a config that must match for ``--resume`` (not where or how it runs)."""
    # evaluation along training reads the networks and changes no weight
    ignored = {
        "out", "device", "num_workers", "log_every", "compile", "preset", "eval_every", "eval_light_size",
    }
    return {k: v for k, v in cfg.items() if k not in ignored}
