"""The comparison grid: variants (a label plus config overrides) x methods x seeds, and running it.

The command-line strings of ``emanorm compare`` are parsed here; the plan (what runs, which are
done) is :mod:`emanorm.experiments.planner`, the process pool that trains it
:mod:`emanorm.experiments.runner`. Their public names are importable from here too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emanorm.errors import UserError
from emanorm.experiments.planner import (
    BN_ONLY_KEYS,
    BN_ONLY_NORMS,
    GRID_KEYS,
    PN_NORMS,
    RunOutcome,
    RunSpec,
    Variant,
    _number,
    build_variants,
    check_existing,
    check_init_sources,
    identical_runs,
    method_has_batch_norm,
    plan_grid,
    resolve_run_config,
    slug,
)
from emanorm.train.lock import RunBusyError, run_lock
from emanorm.train.presets import parse_key_value, parse_value  # the one KEY=VALUE parser

# The runner (torch, the trainer) loads on first use of one of its names, so that parsing and
# planning a grid (``emanorm compare``'s argument checks) import no torch.
_RUNNER_NAMES = (
    "PARENT_ENV", "StepProgress", "die_with_parent", "run_grid", "steps_done", "write_run_config",
)


def __getattr__(name: str) -> Any:
    if name in _RUNNER_NAMES:
        from emanorm.experiments import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from emanorm.experiments.runner import (
        PARENT_ENV,
        StepProgress,
        die_with_parent,
        run_grid,
        steps_done,
        write_run_config,
    )

__all__ = [
    "BN_ONLY_KEYS",
    "BN_ONLY_NORMS",
    "GRID_KEYS",
    "PARENT_ENV",
    "PN_NORMS",
    "RunBusyError",
    "RunOutcome",
    "RunSpec",
    "StepProgress",
    "Variant",
    "_number",
    "build_variants",
    "check_existing",
    "check_init_sources",
    "die_with_parent",
    "identical_runs",
    "method_has_batch_norm",
    "parse_floats",
    "parse_init_from",
    "parse_key_value",
    "parse_method_args",
    "parse_seeds",
    "parse_value",
    "parse_variant",
    "plan_grid",
    "resolve_run_config",
    "run_grid",
    "run_lock",
    "slug",
    "split_list",
    "steps_done",
    "write_run_config",
]

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
