"""The comparison grid: variants (a label plus config overrides) x methods x seeds, and running it.

A run is *finished* when its ``summary.json`` exists and is never trained again; any other run is
started with ``resume=True``, so a killed ``emanorm compare`` continues where it stopped.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from emanorm.data import dataset_info
from emanorm.errors import UserError
from emanorm.evaluation.monitor import knn_monitor
from emanorm.methods import METHODS as METHOD_CLASSES
from emanorm.train import train
from emanorm.train.config import (
    METHODS,
    NORMS,
    SEMI_SUPERVISED,
    comparable,
    dump_config,
    preset_names,
    resolve_config,
)
from emanorm.train.lock import RunBusyError, run_lock
from emanorm.train.recipe import make_method

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


# -- parsing ---------------------------------------------------------------------------------------


def split_list(text: str | None, what: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]``; duplicates are an error (they would be the same runs)."""
    if text is None:
        return []
    items = [item.strip() for item in text.split(",") if item.strip()]
    seen = set()
    for item in items:
        if item in seen:
            raise UserError(f"{what} lists {item!r} twice")
        seen.add(item)
    return items


def parse_floats(text: str | None, what: str) -> list[float]:
    """``"0.9,0.99999"`` -> floats in [0, 1]."""
    values = []
    for item in split_list(text, what):
        try:
            value = float(item)
        except ValueError:
            raise UserError(f"{what} takes numbers like 0.9,0.99999, got {item!r}") from None
        if not 0.0 <= value <= 1.0:
            raise UserError(f"{what} values must lie in [0, 1], got {item!r}")
        values.append(value)
    return values


def _number(value: float) -> str:
    """Short but exact enough for labels: 0.99999 stays 0.99999 (``:g`` would round at 6 digits)."""
    return format(value, ".10g")


def parse_value(text: str) -> Any:
    """A config value as ``emanorm train --set`` reads it (YAML: numbers, booleans, null, lists, maps)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise UserError(f"cannot parse the value {text!r}") from None


def parse_key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with the semantics of ``emanorm train --set`` (dashes in KEY become underscores)."""
    if "=" not in text:
        raise UserError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip().replace("-", "_"), parse_value(value)


def _set_override(overrides: dict[str, Any], key: str, value: Any) -> None:
    """``method_args.threshold`` (a dotted key) sets one entry of a mapping option."""
    if "." in key:
        parent, child = key.split(".", 1)
        nested = overrides.setdefault(parent, {})
        if not isinstance(nested, dict):
            raise UserError(f"{parent} is set to {nested!r} and to {key}=...; choose one")
        nested[child] = value
    else:
        overrides[key] = value


# a comma separates items only when a KEY= follows it, so list values like [0.6,0.8] stay whole
_ITEM_SPLIT = re.compile(r",(?=\s*[A-Za-z_][\w.-]*\s*=)")


def parse_variant(text: str) -> Variant:
    """``LABEL:KEY=VALUE[,KEY=VALUE...]`` -> a :class:`Variant`.

    Two keys are the grid's, not the config's: ``method=NAME`` runs another method in the column's
    recipe, ``columns=[a,b]`` limits the row to those columns.
    """
    if ":" not in text:
        raise UserError(f"--variant takes LABEL:KEY=VALUE[,KEY=VALUE...], got {text!r}")
    label, body = text.split(":", 1)
    label = label.strip()
    if not label:
        raise UserError(f"--variant {text!r} has an empty label")
    overrides: dict[str, Any] = {}
    for item in _ITEM_SPLIT.split(body):
        if item.strip():
            key, value = parse_key_value(item)
            _set_override(overrides, key, value)
    if not overrides:
        raise UserError(f"--variant {label!r} sets nothing; give KEY=VALUE pairs after the colon")
    method = overrides.pop("method", None)
    columns = overrides.pop("columns", None)
    if isinstance(columns, str):
        columns = [columns]
    if columns is not None and not (isinstance(columns, list) and all(isinstance(c, str) for c in columns)):
        raise UserError(f"--variant {label!r}: columns takes a list of methods like [fixmatch,moco]")
    for key in ("seed", "out"):
        if key in overrides:
            raise UserError(f"--variant {label!r} sets {key}, which the grid sets itself")
    return Variant(label, overrides, method=method, only=tuple(columns) if columns else None)


def parse_init_from(text: str | None) -> list[tuple[str, str | None]]:
    """``scratch,NAME=PATH,PATH`` -> ``[(name, path or None)]``; PATH may hold ``{seed}``."""
    entries: list[tuple[str, str | None]] = []
    for item in split_list(text, "--init-from"):
        if item == "scratch":
            entries.append(("scratch", None))
            continue
        name, path = item.split("=", 1) if "=" in item else ("", item)
        if not name:
            # runs/cmp/runs/moco-eman-s{seed} -> moco-eman
            name = Path(path).name.replace("-s{seed}", "").replace("{seed}", "*") or path
        entries.append((name.strip(), path.strip()))
    names = [name for name, _ in entries]
    if len(set(names)) != len(names):
        raise UserError(f"--init-from names repeat ({', '.join(names)}); name them with NAME=PATH")
    return entries


def parse_method_args(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["byol:hidden_dim=32", ...]`` -> ``{"byol": {"hidden_dim": 32}}`` (options of one method)."""
    parsed: dict[str, dict[str, Any]] = {}
    for text in items:
        if ":" not in text or "=" not in text.split(":", 1)[1]:
            raise UserError(f"--method-arg takes METHOD:KEY=VALUE (e.g. byol:hidden_dim=512), got {text!r}")
        method, body = text.split(":", 1)
        key, value = parse_key_value(body)
        parsed.setdefault(method.strip(), {})[key] = value
    return parsed


def parse_seeds(count: int, first: int = 0) -> list[int]:
    if count < 1:
        raise UserError(f"--seeds must be at least 1, got {count}")
    if first < 0:
        raise UserError(f"--first-seed must be >= 0, got {first}")
    return list(range(first, first + count))


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
            raise UserError(f"unknown norm {norm!r} in --norms; allowed: {', '.join(NORMS)}")
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
    """Every run of the grid with its resolved config; invalid settings fail here, before any training."""
    if not methods:
        raise UserError(f"--methods is empty; choose from {', '.join(METHODS)}")
    for method in method_args or {}:
        if method not in METHODS:
            raise UserError(f"--method-arg names unknown method {method!r}; allowed: {', '.join(METHODS)}")
    for method in methods:
        if method not in METHODS:
            raise UserError(f"unknown method {method!r} in --methods; allowed: {', '.join(METHODS)}")
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
    invalid: list[str] = []
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
                cls = METHOD_CLASSES[cfg["method"]]
                if cfg["norm"] not in cls.NORMS:
                    allowed = ", ".join(cls.NORMS)
                    invalid.append(f"{cfg['method']} with norm {cfg['norm']} (allowed: {allowed})")
                unknown = sorted(set(cfg["method_args"] or {}) - set(cls.OPTIONS))
                if unknown:
                    invalid.append(
                        f"{cfg['method']} with method_args {', '.join(unknown)} "
                        f"(allowed: {', '.join(cls.OPTIONS) or 'none'}; limit a --variant with columns=[...])"
                    )
                specs.append(RunSpec(variant.label, column, seed, name, run_dir, cfg))
    if invalid:
        raise UserError(f"invalid settings in the grid: {'; '.join(sorted(set(invalid)))}")
    if not specs:
        raise UserError("the grid is empty: no variant applies to the chosen --methods")
    return specs


def method_has_batch_norm(cfg: dict[str, Any]) -> bool:
    """Whether the networks a run's config builds (plain BN plan, on CPU) hold any BatchNorm layer."""
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
    from emanorm.train.config import comparable

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
        old, new = comparable(previous), comparable(spec.config)
        differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if differ:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:3])
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


# -- running -----------------------------------------------------------------------------------------


def write_run_config(spec: RunSpec, folder: Path) -> Path:
    """The run's resolved config as YAML (``emanorm train --config FILE`` reproduces the run)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{spec.name}.yaml"
    path.write_text(dump_config(spec.config))
    return path


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _last_error_line(log_file: Path) -> str:
    """The most useful line of a failed run's log: its ``emanorm: error:`` line, else the last one."""
    try:
        lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    for line in reversed(lines):
        if line.startswith("emanorm: error:"):
            return line[len("emanorm: error:") :].strip()
    return lines[-1] if lines else "no output"


class _Children:
    """The training subprocesses alive now, so an interrupt can stop them all."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()
        self.stopping = False

    def terminate(self) -> None:
        with self.lock:
            self.stopping = True
            for proc in self.procs:
                if proc.poll() is None:
                    proc.terminate()


def _exit_error(code: int, log_file: Path) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit status {code}: {_last_error_line(log_file)}"


#: Set by ``compare`` for its training subprocesses: the pid they must not outlive.
PARENT_ENV = "EMANORM_PARENT_PID"


def die_with_parent() -> None:
    """In a training subprocess of ``compare``: ask the kernel for SIGTERM when the parent dies
    (Linux ``PR_SET_PDEATHSIG``), so a ``compare`` killed with SIGKILL leaves no trainer behind;
    exit at once if the parent is already gone. A no-op elsewhere."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if str(os.getppid()) != parent:
        raise SystemExit(f"emanorm: the compare process {parent} that started this run is gone")


def _run_subprocess(
    spec: RunSpec, config_file: Path, log_file: Path, threads: int, children: _Children
) -> tuple[str | None, float]:
    started = time.perf_counter()
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env[PARENT_ENV] = str(os.getpid())  # the child dies with this process (die_with_parent)
    command = [sys.executable, "-m", "emanorm", "train", "--config", str(config_file), "--resume"]
    command.append("--no-progress")
    try:
        with run_lock(log_file.with_suffix(".lock")) as lock_fd, log_file.open("w") as handle:
            handle.write("$ " + " ".join(command) + "\n")
            handle.flush()
            with children.lock:
                if children.stopping:
                    return "interrupted before it started", 0.0
                proc = subprocess.Popen(
                    command,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    env=env,
                    pass_fds=() if lock_fd is None else (lock_fd,),
                )
                children.procs.add(proc)
            try:
                code = proc.wait()
            finally:
                with children.lock:
                    children.procs.discard(proc)
    except RunBusyError as err:
        return str(err), 0.0
    seconds = time.perf_counter() - started
    return (_exit_error(code, log_file) if code != 0 else None), seconds


@contextlib.contextmanager
def _quiet_trainer() -> Iterator[None]:
    """The trainer's progress lines stay out of compare's own bar (warnings still show)."""
    logger = logging.getLogger("emanorm")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def steps_done(spec: RunSpec) -> int:
    """The last step a run's metrics.jsonl records (0 before its first record)."""
    path = spec.run_dir / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        with contextlib.suppress(json.JSONDecodeError, TypeError, ValueError):
            return int(json.loads(line)["step"])
    return 0


class StepProgress:
    """compare's bar in training steps over the whole grid (with an ETA) when every run has a
    ``max_steps`` budget; a thread reads the running runs' metrics.jsonl every ``interval`` s."""

    def __init__(self, bar: Any, specs: Sequence[RunSpec], interval: float = 2.0) -> None:
        self.bar, self.interval = bar, interval
        self.planned = {s.name: int(s.config["max_steps"]) for s in specs}
        self.finished: set[str] = set()
        self.specs = {s.name: s for s in specs}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    @staticmethod
    def applies(specs: Sequence[RunSpec]) -> bool:
        return bool(specs) and all(s.config.get("max_steps") for s in specs)

    def total(self) -> int:
        return sum(self.planned.values())

    def done(self) -> int:
        return sum(
            self.planned[name] if name in self.finished else min(steps_done(spec), self.planned[name])
            for name, spec in self.specs.items()
        )

    def refresh(self) -> None:
        self.bar.n = self.done()
        self.bar.refresh()

    def _poll(self) -> None:
        while not self.stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a progress display must never stop the grid
                self.refresh()

    def __enter__(self) -> StepProgress:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()


def _run_in_process(spec: RunSpec, log_file: Path) -> str | None:
    try:
        with run_lock(log_file.with_suffix(".lock")), _quiet_trainer():
            train(copy.deepcopy(spec.config), monitor=knn_monitor, resume=True, progress=False)
    except RunBusyError as err:
        return str(err)
    except UserError as err:
        log_file.write_text(f"emanorm: error: {err}\n")
        return str(err)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # one broken run must not stop the grid; the log keeps the traceback
        log_file.write_text(traceback.format_exc())
        return f"{type(err).__name__}: {err}"
    return None


def run_grid(
    specs: Sequence[RunSpec],
    out: str | Path,
    *,
    jobs: int = 1,
    progress: bool = True,
    on_done: Callable[[RunOutcome], None] | None = None,
) -> list[RunOutcome]:
    """Train every unfinished run; finished ones are skipped. Failures are recorded, the rest go on.

    ``jobs == 1`` trains in this process (one run at a time, all CPU threads). ``jobs > 1`` starts
    that many ``python -m emanorm train --config OUT/configs/NAME.yaml --resume`` subprocesses at
    once, each with ``OMP_NUM_THREADS = cpus // jobs``; their output goes to ``OUT/logs/NAME.log``.
    """
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    out = Path(out)
    outcomes: dict[str, RunOutcome] = {}
    todo = []
    for spec in specs:
        if spec.state() == "finished":
            outcomes[spec.name] = RunOutcome(spec, "skipped")
        else:
            todo.append(spec)
    if todo:
        (out / "logs").mkdir(parents=True, exist_ok=True)
    threads = max(1, _cpu_count() // jobs)
    by_steps = StepProgress.applies(todo)
    bar = tqdm(
        total=sum(int(s.config["max_steps"]) for s in todo) if by_steps else len(todo),
        desc="compare", unit="step" if by_steps else "run", disable=not progress or not todo,
    )
    steps = StepProgress(bar, todo) if by_steps and not bar.disable else None
    failures = 0
    runs_done = 0

    def finish(spec: RunSpec, error: str | None, seconds: float) -> None:
        nonlocal failures, runs_done
        outcome = RunOutcome(spec, "failed" if error else "trained", error, seconds)
        outcomes[spec.name] = outcome
        failures += error is not None
        runs_done += 1
        shown = f"{runs_done}/{len(todo)} runs, last: {spec.name}"
        shown += f", {failures} failed" if failures else ""
        bar.set_postfix_str(shown, refresh=False)
        if steps is not None:
            steps.finished.add(spec.name)
            steps.refresh()
        else:
            bar.update(1)
        if error:
            log.warning("run %s failed: %s", spec.name, error)
        if on_done is not None:
            on_done(outcome)

    # SIGTERM (a scheduler, `kill`) stops the grid like Ctrl-C: children terminated, checkpoints kept
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
        previous_handler = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if steps is not None:
            steps.__enter__()
        if jobs == 1:
            for spec in todo:
                write_run_config(spec, out / "configs")
                started = time.perf_counter()
                bar.set_description(f"compare: {spec.name}")
                error = _run_in_process(spec, out / "logs" / f"{spec.name}.log")
                finish(spec, error, time.perf_counter() - started)
        else:
            children = _Children()
            pool = ThreadPoolExecutor(max_workers=jobs)
            try:
                futures = {}
                for spec in todo:
                    config_file = write_run_config(spec, out / "configs")
                    log_file = out / "logs" / f"{spec.name}.log"
                    future = pool.submit(_run_subprocess, spec, config_file, log_file, threads, children)
                    futures[future] = spec
                for future in as_completed(futures):
                    finish(futures[future], *future.result())
            except BaseException:
                children.terminate()  # the checkpoints stay: the next invocation resumes them
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            pool.shutdown(wait=True)
    finally:
        if steps is not None:
            steps.__exit__(None, None, None)
        bar.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    return [outcomes[spec.name] for spec in specs]


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
