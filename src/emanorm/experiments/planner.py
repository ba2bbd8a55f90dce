"""The grid's planner: what runs (variants x methods x seeds, each with its resolved config), which
are done (``RunSpec.state``), and which plans are refused before anything trains (identical runs,
existing runs of another config, missing ``init_from`` sources). Run by :mod:`emanorm.experiments.runner`.

Torch loads only where a network is built (whether a network holds BatchNorm, for
:func:`identical_runs`): ``emanorm compare`` answers a mistake in its grid before that.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from emanorm.catalog import METHOD_NORMS, METHOD_OPTIONS
from emanorm.errors import UserError
from emanorm.train.config import (
    LABEL_KEYS,
    METHODS,
    NORMS,
    SEMI_SUPERVISED,
    comparable,
    config_changes,
    keep_recorded_start,
    preset_names,
    resolve_config,
)
from emanorm.train.schema import suggestion

log = logging.getLogger("emanorm")

PN_NORMS = ("teacher_pn", "student_pn")
# --norm values that differ only in what BatchNorm layers do (shuffle_bn also draws permutations,
# and FixMatch's "default" has no teacher), and the config keys that only BatchNorm reads
BN_ONLY_NORMS = ("bn", "sync_bn", "gn", "in", "eman", "teacher_pn", "student_pn")
BN_ONLY_KEYS = ("norm", "bn_momentum", "eman_momentum")
# keys the grid itself sets: a --set or --variant may not override them
GRID_KEYS = ("method", "seed", "out")


@dataclass
class Variant:
    """One row of a comparison table: a label and the config overrides that make it.

    ``method`` runs another method in the column's recipe (the ``supervised`` row runs
    ``supervised`` with FixMatch's labels and budget); ``only`` limits the variant to some columns.
    """

    label: str
    overrides: dict[str, Any] = field(default_factory=dict)
    method: str | None = None
    only: tuple[str, ...] | None = None

    def applies_to(self, column: str) -> bool:
        return self.only is None or column in self.only


@dataclass
class RunSpec:
    """One run of the grid: a cell (variant, column method) and a seed, with its resolved config."""

    variant: str
    method: str  # the column; the config's method differs for the supervised row
    seed: int
    name: str
    run_dir: Path
    config: dict[str, Any]

    @property
    def summary_path(self) -> Path:
        return self.run_dir / "summary.json"

    def state(self) -> str:
        """``finished`` (summary.json exists), ``partial`` (started, not finished) or ``new``."""
        if self.summary_path.exists():
            return "finished"
        if (self.run_dir / "config.yaml").exists() or (self.run_dir / "checkpoints" / "last.pt").exists():
            return "partial"
        return "new"


@dataclass
class RunOutcome:
    """What this invocation did with a run: ``skipped`` (finished before), ``trained`` or ``failed``."""

    spec: RunSpec
    status: str
    error: str | None = None
    seconds: float = 0.0



def _number(value: float) -> str:
    """Short but exact enough for labels: 0.99999 stays 0.99999 (``:g`` would round at 6 digits)."""
    return format(value, ".10g")


# -- building the grid ------------------------------------------------------------------------------


def build_variants(
    norms: Sequence[str],
    *,
    eman_momentums: Sequence[float] = (),
    bn_momentums: Sequence[float] = (),
    init_from: Sequence[tuple[str, str | None]] = (),
    custom: Sequence[Variant] = (),
    supervised: bool = False,
) -> list[Variant]:
    """The rows of a comparison, in order.

    - one variant per ``norms`` entry; a ``teacher_pn`` / ``student_pn`` entry becomes one variant
      per ``bn_momentums`` value (PyTorch momentum; labelled with the paper's alpha = 1 - momentum);
    - ``eman_momentums`` adds ``eman(m=...)`` variants (after ``eman`` when it is listed);
    - ``custom`` variants (``--variant``) follow; ``supervised`` adds the supervised baseline row
      for the semi-supervised columns;
    - ``init_from`` crosses every variant with each start point (``scratch`` or a run).
    """
    for norm in norms:
        if norm not in NORMS:
            raise UserError(
                f"unknown norm {norm!r} in --norms{suggestion(norm, NORMS)}; allowed: {', '.join(NORMS)}"
            )
    if bn_momentums and not any(n in PN_NORMS for n in norms):
        raise UserError("--bn-momentums applies to teacher_pn / student_pn; add one of them to --norms")
    variants: list[Variant] = []
    eman_rows = [
        Variant(f"eman(m={_number(m)})", {"norm": "eman", "eman_momentum": m}) for m in eman_momentums
    ]
    for norm in norms:
        if norm in PN_NORMS and bn_momentums:
            for m in bn_momentums:
                label = f"{norm}(alpha={_number(1.0 - m)})"
                variants.append(Variant(label, {"norm": norm, "bn_momentum": m}))
        else:
            variants.append(Variant(norm, {"norm": norm}))
        if norm == "eman":
            variants.extend(eman_rows)
    if "eman" not in norms:
        variants.extend(eman_rows)
    variants.extend(custom)
    if supervised:
        columns = tuple(m for m in SEMI_SUPERVISED if m != "supervised")
        # Evaluated at the end only: its epochs are passes over the few labeled images, so an
        # epoch-based monitor (--eval-every) would evaluate at almost every step.
        overrides = {"norm": "default", "eval_every": 0}
        variants.append(Variant("supervised", overrides, method="supervised", only=columns))
    if init_from:
        crossed = []
        for variant in variants:
            for name, path in init_from:
                overrides = {**variant.overrides, "init_from": path}
                label = f"{variant.label} from {name}"
                crossed.append(Variant(label, overrides, method=variant.method, only=variant.only))
        variants = crossed
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        raise UserError(f"variant labels repeat: {', '.join(repeated)}")
    if not variants:
        raise UserError("the grid is empty: give --norms, --eman-momentums, --variant or --supervised")
    return variants


def slug(label: str) -> str:
    """A label as a directory-name part: ``eman(m=0.9)`` -> ``eman-m-0.9``."""
    text = re.sub(r"[^A-Za-z0-9._+]+", "-", label).strip("-.")
    return text or "variant"


def _substitute_seed(value: Any, seed: int) -> Any:
    if isinstance(value, str):
        return value.replace("{seed}", str(seed))
    if isinstance(value, dict):
        return {k: _substitute_seed(v, seed) for k, v in value.items()}
    return value


def resolve_run_config(
    column: str,
    variant: Variant,
    seed: int,
    run_dir: Path,
    *,
    config: str | None = None,
    common: dict[str, Any] | None = None,
    method_args: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The full config of one run: preset or ``config`` (``{method}`` is replaced by the column),
    then ``common`` (``--set``, budget, dataset), then ``method_args[run method]`` (``--method-arg``),
    then the variant's overrides, then method/seed/out."""
    base = config.replace("{method}", column) if config else None
    run_method = variant.method or column
    overrides: dict[str, Any] = copy.deepcopy(common or {})
    own_args = dict((method_args or {}).get(run_method) or {})
    if own_args:
        overrides["method_args"] = {**(overrides.get("method_args") or {}), **own_args}
    for key, value in variant.overrides.items():
        if key in ("method_args", "augment_options") and isinstance(value, dict):
            overrides[key] = {**(overrides.get(key) or {}), **value}
        else:
            overrides[key] = copy.deepcopy(value)
    overrides.update(method=run_method, seed=seed, out=str(run_dir))
    overrides = _substitute_seed(overrides, seed)
    if run_method != column and base is None:
        # the column's recipe (labels, budget, data), not the other method's preset
        candidate = f"small-{column}"
        base = candidate if candidate in preset_names() else None
    cfg = resolve_config(base, overrides)
    if run_method != column:
        # the column's method options (FixMatch's threshold...) mean nothing to another method
        cfg["method_args"] = {**own_args, **(variant.overrides.get("method_args") or {})}
        if run_method not in SEMI_SUPERVISED:
            # nor do the column recipe's labels to one that trains without them: `emanorm train
            # --config` of the run's written config would refuse them (the row's own are refused
            # by refuse_grid_labels)
            cfg.update(dict.fromkeys(LABEL_KEYS))
    if "init_from" in overrides and overrides["init_from"] is None:
        cfg["init_from"] = None  # 'scratch' beats a config file's init_from (resolve_config drops None)
    return cfg


def plan_grid(
    methods: Sequence[str],
    variants: Sequence[Variant],
    seeds: Sequence[int],
    out: str | Path,
    *,
    config: str | None = None,
    common: dict[str, Any] | None = None,
    method_args: dict[str, dict[str, Any]] | None = None,
) -> list[RunSpec]:
    """Every run of the grid with its resolved config; invalid settings fail here, before any training.

    Everything is checked against the torch-free tables (:mod:`emanorm.catalog`, the config
    schema): unknown methods, norms and keys, label keys for a self-supervised method, each
    method's own norms and options. Planning imports no torch.
    """
    if not methods:
        raise UserError(f"--methods is empty; choose from {', '.join(METHODS)}")
    for method in method_args or {}:
        if method not in METHODS:
            raise UserError(
                f"--method-arg names unknown method {method!r}{suggestion(method, METHODS)}; "
                f"allowed: {', '.join(METHODS)}"
            )
    for method in methods:
        if method not in METHODS:
            raise UserError(
                f"unknown method {method!r} in --methods{suggestion(method, METHODS)}; "
                f"allowed: {', '.join(METHODS)}"
            )
    for key in (*GRID_KEYS, "norm"):
        if common and key in common:
            flag = {"method": "--methods", "seed": "--seeds", "out": "--out", "norm": "--norms"}[key]
            raise UserError(f"--set {key}=... would be overridden by the grid; use {flag}")
    for variant in variants:
        unknown = sorted(set(variant.only or ()) - set(METHODS))
        if unknown:
            raise UserError(
                f"row {variant.label!r} names unknown columns {', '.join(unknown)}; "
                f"allowed: {', '.join(METHODS)}"
            )
    out = Path(out)
    specs: list[RunSpec] = []
    names: dict[str, str] = {}
    # seed-major: an interrupted grid already holds whole tables for its first seeds
    for seed in seeds:
        for variant in variants:
            for column in methods:
                if not variant.applies_to(column):
                    continue
                name = f"{column}-{slug(variant.label)}-s{seed}"
                if name in names:
                    raise UserError(
                        f"variants {names[name]!r} and {variant.label!r} give the same run name {name}; "
                        "rename one"
                    )
                names[name] = variant.label
                run_dir = out / "runs" / name
                cfg = resolve_run_config(
                    column, variant, seed, run_dir, config=config, common=common, method_args=method_args
                )
                refuse_grid_labels(
                    column, variant, cfg, config=config, common=common,
                    label_columns=[m for m in methods if m in SEMI_SUPERVISED],
                )
                specs.append(RunSpec(variant.label, column, seed, name, run_dir, cfg))
    if not specs:
        raise UserError("the grid is empty: no variant applies to the chosen --methods")
    invalid: list[str] = []
    for spec in specs:
        cfg = spec.config
        norms, options = METHOD_NORMS[cfg["method"]], METHOD_OPTIONS[cfg["method"]]
        if cfg["norm"] not in norms:
            allowed = ", ".join(norms)
            invalid.append(f"{cfg['method']} with norm {cfg['norm']} (allowed: {allowed})")
        unknown = sorted(set(cfg["method_args"] or {}) - set(options))
        if unknown:
            invalid.append(
                f"{cfg['method']} with method_args {', '.join(unknown)} "
                f"(allowed: {', '.join(options) or 'none'}; limit a --variant with columns=[...])"
            )
    if invalid:
        raise UserError(f"invalid settings in the grid: {'; '.join(sorted(set(invalid)))}")
    return specs


def refuse_grid_labels(
    column: str,
    variant: Variant,
    cfg: dict[str, Any],
    *,
    config: str | None = None,
    common: dict[str, Any] | None = None,
    label_columns: Sequence[str] = (),
) -> None:
    """A label key (``labels_per_class``, ``label_fraction``, ``label_index_csv``) that reaches a
    run of a method training without labels (MoCo, MoCo v3, BYOL, DINO) would change nothing but
    its recorded config (and so retrain it): refused, as ``emanorm train --method moco
    --labels-per-class 5`` is. The sources are ``--set``, the row's overrides and ``--config``; a
    row running another method in a semi-supervised column (``method=moco``) drops the column
    recipe's labels (``resolve_run_config``), so only its own overrides count. ``label_columns``
    (the grid's columns that use labels) are named in the way out the message gives."""
    method = cfg["method"]
    if method in SEMI_SUPERVISED:
        return
    sources = [("--set", common or {}), (f"--variant {variant.label!r}", variant.overrides)]
    if method == column:  # its own recipe: the --config file or preset
        sources.append((f"--config {config}" if config else f"the {cfg.get('preset')} preset", cfg))
    for source, settings in sources:
        given = [key for key in LABEL_KEYS if settings.get(key) is not None]
        if given:
            key = given[0]
            setting = f"{key}={settings[key]}"
            if label_columns:
                way = (
                    f"give it to {', '.join(label_columns)} only with a row limited to "
                    f"{'them' if len(label_columns) > 1 else 'it'} (--variant "
                    f"'LABEL:{setting},columns=[{','.join(label_columns)}]') or a compare of "
                    f"{'those columns' if len(label_columns) > 1 else 'that column'} alone"
                )
            else:
                way = f"leave it out (methods that use labels: {', '.join(SEMI_SUPERVISED)})"
            raise UserError(
                f"{source} gives {method} {setting}, but {method} trains without labels, so it would "
                f"change nothing (compare's linear probe takes --linear-fraction); {way}"
            )


def method_has_batch_norm(cfg: dict[str, Any]) -> bool:
    """Whether the networks a run's config builds (plain BN plan, on CPU) hold any BatchNorm layer."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from emanorm.data import dataset_info
    from emanorm.train.restore import make_method

    info = dataset_info(cfg["dataset"], image_size=cfg.get("image_size"))
    with warnings.catch_warnings():  # the trainer shows its warnings when the run trains
        warnings.simplefilter("ignore")
        method = make_method({**cfg, "norm": "bn"}, info, distributed=False)
    return any(isinstance(m, _BatchNorm) for m in method.modules())


def _config_key(cfg: dict[str, Any]) -> str:
    return json.dumps(cfg, sort_keys=True, default=str)


def identical_runs(
    specs: Sequence[RunSpec], *, has_batch_norm: Callable[[dict[str, Any]], bool] = method_has_batch_norm
) -> dict[str, tuple[str, str]]:
    """Runs that would train the same model as an earlier run: ``{name: (earlier name, why)}``.

    Two runs are the same when their configs agree on everything training reads, or when they
    differ only in BatchNorm settings (a norm of :data:`BN_ONLY_NORMS`, ``bn_momentum``,
    ``eman_momentum``) and their networks hold no BatchNorm (ViT, ConvNeXt, Swin: LayerNorm):
    then EMAN, BN, PN, GN and IN all train the same plain-EMA model.
    ``has_batch_norm(cfg)`` is asked once per group of such runs.
    """
    from emanorm.methods import METHODS as METHOD_CLASSES

    same: dict[str, tuple[str, str]] = {}
    first: dict[str, str] = {}
    groups: dict[str, list[RunSpec]] = {}
    for spec in specs:
        cfg = comparable(spec.config)
        key = _config_key(cfg)
        if key in first:
            same[spec.name] = (first[key], "the same config")
            continue
        first[key] = spec.name
        norm = cfg["norm"]
        if norm == "default":
            norm = METHOD_CLASSES[cfg["method"]].DEFAULT_NORM
        if norm in BN_ONLY_NORMS:
            rest = _config_key({k: v for k, v in cfg.items() if k not in BN_ONLY_KEYS})
            groups.setdefault(rest, []).append(spec)
    for members in groups.values():
        if len(members) > 1 and not has_batch_norm(members[0].config):
            cfg = members[0].config
            why = f"{cfg['method']} on {cfg['backbone']} has no BatchNorm"
            for spec in members[1:]:
                same[spec.name] = (members[0].name, why)
    for name, (earlier, reason) in list(same.items()):  # point every duplicate at the run that trains
        while earlier in same:
            earlier = same[earlier][0]
        same[name] = (earlier, reason)
    return same


def check_existing(specs: Iterable[RunSpec]) -> None:
    """Refuse to mix configs: a started or finished run must have been made with the config planned now."""
    problems = []
    for spec in specs:
        if spec.state() == "new":
            continue
        config_file = spec.run_dir / "config.yaml"
        if not config_file.exists():
            continue
        try:
            previous = yaml.safe_load(config_file.read_text()) or {}
            if not isinstance(previous, dict):
                raise ValueError(f"a {type(previous).__name__}, not a mapping")
        except (yaml.YAMLError, ValueError, OSError, RecursionError):  # ValueError: not UTF-8
            problems.append(f"{spec.name}: {config_file} is not valid YAML")
            continue
        keep_recorded_start(previous, spec.config)  # as the run resumes: it started with them
        details = config_changes(previous, spec.config, limit=3)
        if details:
            problems.append(f"{spec.name} ({details})")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise UserError(
            f"runs in this --out were made with a different config: {shown}. "
            "Use another --out, or delete those run directories to redo them"
        )


def check_init_sources(specs: Iterable[RunSpec]) -> None:
    """Every --init-from source must exist and, if it is a run directory, be finished."""
    missing = []
    for spec in specs:
        source = spec.config.get("init_from")
        if not source or spec.state() == "finished":
            continue
        path = Path(source)
        if path.is_dir() and not (path / "summary.json").exists():
            missing.append(f"{source} (not finished: no summary.json)")
        elif not path.exists():
            missing.append(f"{source} (not found)")
    if missing:
        raise UserError(f"--init-from sources are not ready: {', '.join(sorted(set(missing)))}")
