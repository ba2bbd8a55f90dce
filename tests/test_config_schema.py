"""The config schema (issue 28 item 2) and the torch-free catalog of names (item 5, issue 31).

Everything the command line derives from ``TrainConfig`` and ``emanorm.catalog``: flags, defaults,
validation, ``comparable()``, the ``key=value`` parser, and the tables the registries must equal.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from emanorm import catalog
from emanorm.cli import build_parser
from emanorm.errors import UserError
from emanorm.train.config import (
    CHOICES,
    DEFAULTS,
    FIELDS,
    NOT_AFFECTING_WEIGHTS,
    TrainConfig,
    comparable,
    resolve_config,
)
from emanorm.train.presets import parse_key_value, preset_names


# -- the catalog equals the registries -----------------------------------------------------------
def test_catalog_methods_equal_the_method_registry():
    from emanorm.methods import METHODS

    assert tuple(METHODS) == catalog.METHOD_NAMES
    assert tuple(name for name, cls in METHODS.items() if cls.semi_supervised) == catalog.SEMI_SUPERVISED
    assert {norm for cls in METHODS.values() for norm in cls.NORMS} <= set(catalog.ALL_NORMS)


def test_catalog_method_norms_and_options_equal_each_method_class():
    """The command line refuses a method's unknown option or disallowed norm from these tables,
    before torch loads, in the classes' words (tests/test_cli_startup.py)."""
    from emanorm.methods import METHODS

    assert {name: cls.NORMS for name, cls in METHODS.items()} == catalog.METHOD_NORMS
    for name, cls in METHODS.items():
        assert list(cls.OPTIONS.items()) == list(catalog.METHOD_OPTIONS[name].items()), name  # order too


def test_catalog_backbones_datasets_and_evaluation_defaults_equal_their_modules():
    from emanorm.data import DATASETS, build_augmentation
    from emanorm.evaluation import DEFAULT_BACKBONE_LRS, DEFAULT_LINEAR_LRS, DEFAULT_SHOTS, EXPORT_FORMATS
    from emanorm.evaluation.context import PROTOCOLS, WHICH
    from emanorm.models import BACKBONES

    assert catalog.BACKBONES == BACKBONES
    assert catalog.DATASETS == DATASETS
    assert (catalog.EVAL_PROTOCOLS, catalog.EVAL_NETWORKS) == (PROTOCOLS, WHICH)
    # the evaluation modules read these from the catalog (the CLI shows them before torch loads)
    assert DEFAULT_LINEAR_LRS is catalog.DEFAULT_LINEAR_LRS and DEFAULT_SHOTS is catalog.DEFAULT_SHOTS
    assert DEFAULT_BACKBONE_LRS is catalog.DEFAULT_BACKBONE_LRS and EXPORT_FORMATS is catalog.EXPORT_FORMATS
    keywords = {
        p.name: str(p.annotation) for p in inspect.signature(build_augmentation).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    assert list(keywords) == list(catalog.AUGMENT_OPTIONS)
    for name, kind in catalog.AUGMENT_OPTIONS.items():
        assert kind == "pair" or keywords[name].startswith(kind), (name, kind, keywords[name])


def test_one_table_names_the_norm_plans_and_teacher_modes():
    from emanorm import NORM_MODES, TEACHER_MODES
    from emanorm.methods import ALL_NORMS, TEACHER_NORMS, plan_norm
    from emanorm.norms import NORM_KINDS

    assert tuple(catalog.NORM_PLANS) == ALL_NORMS and TEACHER_MODES is catalog.TEACHER_MODES
    assert NORM_MODES == tuple(TEACHER_MODES) == ("eman", "bn", "student_pn", "teacher_pn")
    assert TEACHER_NORMS == ("eman", "teacher_pn", "student_pn")
    assert NORM_KINDS == ("bn", "sync_bn", "gn", "in")
    for norm, choice in catalog.NORM_PLANS.items():
        assert choice.teacher_mode is None or choice.teacher_mode in TEACHER_MODES
        if norm == "default":
            continue
        plan = plan_norm("m", norm, allowed=ALL_NORMS, default="bn", num_splits=4)
        assert (plan.layer_kind, plan.teacher_mode, plan.shuffle) == (
            choice.layer_kind, choice.teacher_mode, choice.shuffle,
        )
    fixmatch_default = plan_norm("fixmatch", "default", allowed=ALL_NORMS, default="default")
    assert (fixmatch_default.layer_kind, fixmatch_default.teacher_mode) == ("bn", None)


# -- the schema drives defaults, flags and checks ----------------------------------------------------
def test_defaults_and_choices_come_from_the_dataclass():
    assert dataclasses.asdict(TrainConfig()) == DEFAULTS and list(DEFAULTS) == list(FIELDS)
    assert CHOICES["method"] == catalog.METHOD_NAMES and CHOICES["norm"] == catalog.ALL_NORMS
    assert CHOICES["dataset"] == catalog.DATASETS
    for key, schema_field in FIELDS.items():
        assert schema_field.metadata["help"], key


def test_every_flagged_key_is_a_train_flag_with_the_schemas_help():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    by_dest = {action.dest: action for action in train._actions}
    flagged = [key for key, f in FIELDS.items() if f.metadata["flag"] is not None]
    assert {"method", "norm", "labels_per_class", "epochs", "accumulate", "logger", "out"} <= set(flagged)
    for key in flagged:
        action = by_dest[key]
        assert FIELDS[key].metadata["help"].split(":")[0][:30] in action.help.replace("%%", "%"), key
        assert action.option_strings == [FIELDS[key].metadata["flag"].name or "--" + key.replace("_", "-")]


def test_every_preset_resolves_against_the_schema():
    for name in preset_names():
        overrides = {"init_from": "x"} if "from-moco" in name else {}
        cfg = resolve_config(name, overrides)
        assert set(cfg) == {*DEFAULTS, "preset"}
        TrainConfig(**{k: v for k, v in cfg.items() if k != "preset"})  # the typed view


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"norm": "EMAN"}, "unknown norm 'EMAN' (did you mean 'eman'?); allowed: default, bn"),
        ({"method": "fixmach"}, "unknown method 'fixmach' (did you mean 'fixmatch'?)"),
        ({"dataset": "cifar"}, "unknown dataset 'cifar'"),
        ({"backbone": "resnet18x"}, "backbone 'resnet18x' (did you mean 'resnet18'?); allowed: small,"),
        ({"backbone": "timm:"}, "unknown backbone 'timm:'; allowed: small,"),
        ({"optimizer": "adam"}, "unknown optimizer 'adam' (did you mean 'adamw'?); allowed: sgd, lars"),
        ({"channels_last": 1}, "unknown channels_last 1"),
        ({"batch_size": 0}, "batch_size must be positive, got 0"),
        ({"batch_size": "64"}, "batch_size must be a positive int, got '64'"),
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
        ({"eval_every": -1}, "eval_every must be an integer >= 0"),
        ({"warmup_epochs": -1}, "warmup_epochs must be a number >= 0"),
        ({"bn_momentum": 2}, "bn_momentum must lie in [0, 1], got 2"),
        ({"label_fraction": 0}, "label_fraction must lie in (0, 1], got 0"),
        ({"lr": -0.1}, "lr must be a positive number, got -0.1"),
        ({"data_dir": 7}, "data_dir must be a string, got 7"),
        ({"method_args": [1]}, "method_args must be a mapping"),
        ({"logger": "jsonl,tensorbord"}, "unknown logger 'tensorbord' (did you mean 'tensorboard'?)"),
    ],
)
def test_bad_values_name_the_value_and_what_is_allowed(overrides, message):
    with pytest.raises(UserError) as caught:
        resolve_config(None, {"max_steps": 1, **overrides})
    assert message in str(caught.value)


def test_unknown_keys_get_a_suggestion():
    with pytest.raises(UserError) as caught:
        resolve_config(None, {"max_steps": 1}, explicit={"knn_kk": 5})
    assert "unknown option(s) in command line: knn_kk (did you mean 'knn_k'?)" in str(caught.value)


def test_values_are_normalised_to_their_type():
    cfg = resolve_config(None, {"max_steps": 2.0}, explicit={"lr": 1, "weight_decay": "1e-6", "logger": None})
    assert cfg["logger"] == ""
    assert resolve_config(None, {"max_steps": 1, "logger": ["jsonl", "wandb"]})["logger"] == "jsonl,wandb"
    assert cfg["max_steps"] == 2 and isinstance(cfg["max_steps"], int)
    assert cfg["lr"] == 1.0 and isinstance(cfg["lr"], float)
    assert cfg["weight_decay"] == 1e-6  # YAML 1.1 reads 1e-6 as a string


# -- comparable() ------------------------------------------------------------------------------------
def test_comparable_ignores_exactly_what_cannot_change_the_weights():
    assert {
        "knn_k", "knn_bank_size", "monitor_test_size", "checkpoint_every_steps", "eval_every",
        "eval_light_size", "log_every", "logger", "out", "device", "num_workers", "compile",
        "loader_timeout", "preset",
    } == NOT_AFFECTING_WEIGHTS
    base = resolve_config(None, {"max_steps": 3})
    for key, value in {"knn_k": 5, "knn_bank_size": 100, "monitor_test_size": 10, "checkpoint_every_steps": 7,
                       "logger": "jsonl", "out": "elsewhere"}.items():
        assert comparable({**base, key: value}) == comparable(base), key
    for key, value in {"lr": 0.1, "norm": "bn", "seed": 1, "bn_splits": 2, "amp": "off"}.items():
        assert comparable({**base, key: value}) != comparable(base), key


def test_an_old_config_without_newer_keys_or_with_dropped_ones_stays_comparable():
    new = resolve_config(None, {"max_steps": 3})
    old = {k: v for k, v in new.items() if k not in ("accumulate", "bn_splits", "eval_light_size")}
    assert comparable(old) == comparable(new)
    assert comparable({**new, "a_key_a_later_version_dropped": 1}) == comparable(new)


# -- key=value --------------------------------------------------------------------------------------
def test_one_key_value_parser_for_every_set_flag():
    from emanorm.cli.common import key_value
    from emanorm.experiments import grid

    assert parse_key_value("warmup-epochs=5") == ("warmup_epochs", 5)
    assert parse_key_value("lr_milestones=[0.5, 0.75]") == ("lr_milestones", [0.5, 0.75])
    assert parse_key_value("labels_per_class=null") == ("labels_per_class", None)
    assert parse_key_value("out=a=b") == ("out", "a=b")
    with pytest.raises(UserError, match="expected KEY=VALUE, got 'lr'"):
        parse_key_value("lr")
    with pytest.raises(UserError, match="cannot parse the value"):
        parse_key_value("lr=[1,")
    assert grid.parse_key_value is parse_key_value
    assert key_value("seed=3") == ("seed", 3)
