"""A protocol's result on file and on screen: scores as percents, the JSON record, the table."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from emanorm.errors import UserError
from emanorm.evaluation.context import EvalContext, label_setting, run_dir_of
from emanorm.evaluation.monitor import percent
from emanorm.train.checkpoint import atomic_write_text

_CONFIG_KEYS = ("method", "norm", "backbone", "dataset", "seed", "steps", "epochs")


@dataclass
class ProtocolResult:
    """A protocol's outcome: scores (fractions), the settings it ran with, the rows of its table."""

    protocol: str
    results: dict[str, Any]
    settings: dict[str, Any]
    rows: list[tuple[str, str]]


def jsonable(value: Any) -> Any:
    """``value`` with tensors and arrays as lists, paths as strings and non-finite floats as None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (Tensor, np.ndarray, np.generic)):
        return jsonable(value.tolist())
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
            k: _as_percent(jsonable(v)) if k in PERCENT_KEYS else results_in_percent(v)
            for k, v in results.items()
        }
    if isinstance(results, (list, tuple)):
        return [results_in_percent(v) for v in results]
    return results


def result_path(ctx: EvalContext, protocol: str) -> Path:
    """``--out``, or ``RUN_DIR/eval_<protocol>_<which>[_<labels>][_<dataset>].json``."""
    request = ctx.request
    _, suffix = label_setting(request)
    if request.dataset and request.dataset != ctx.config.get("dataset"):
        suffix += f"_{request.dataset}"
    if request.out:
        return Path(request.out)
    return run_dir_of(request.run) / f"eval_{protocol}_{request.which}{suffix}.json"


def result_record(ctx: EvalContext, result: ProtocolResult) -> dict[str, Any]:
    """The JSON record of ``eval_<protocol>_<which>.json``: scores in percent, with their context."""
    request = ctx.request
    record = {
        "protocol": result.protocol,
        "which": request.which,
        "checkpoint": str(request.run),
        "dataset": ctx.dataset,
        "data_dir": ctx.data_dir,
        "test_split": ctx.test_split,
        "labels": ctx.labels,
        "seed": ctx.seed,
        "device": str(ctx.device),
        "settings": result.settings,
        "unit": "percent",
        "results": results_in_percent(jsonable(result.results)),
        "run_config": {k: ctx.config[k] for k in _CONFIG_KEYS if k in ctx.config},
        "input_adaptation": ctx.adaptation,
        "elapsed_s": round(time.time() - ctx.started, 2),
    }
    return jsonable(record)


def result_title(ctx: EvalContext, result: ProtocolResult) -> str:
    """The table's title: protocol, network, data, labels."""
    labels = (
        "all labels"
        if ctx.labels == {"label_fraction": 1.0}
        else ", ".join(f"{k}={v}" for k, v in ctx.labels.items())
    )
    return f"{result.protocol} | {ctx.request.which} | {ctx.dataset} ({ctx.test_split}) | {labels}"


def result_rows(ctx: EvalContext, result: ProtocolResult) -> list[tuple[str, str]]:
    """The table's rows: the protocol's, then how the input was adapted (another dataset)."""
    rows = list(result.rows)
    if ctx.adaptation:
        rows += [(f"input {k}", str(v)) for k, v in ctx.adaptation.items()]
    return rows


def format_table(title: str, rows: Sequence[tuple[str, str]]) -> str:
    """A two-column plain-text table."""
    width = max([len(name) for name, _ in rows] + [6])
    lines = [title, f"  {'metric':<{width}}  value", f"  {'-' * width}  {'-' * 12}"]
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def write_json(out: Path, record: dict[str, Any], *, printed: bool = True) -> None:
    """Write ``record``; a failed write is a :class:`UserError` (the result is printed already)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(record, indent=2) + "\n")  # a full disk: no empty file left
    except OSError as err:
        why = err.strerror or err
        where = "; the result is printed above" if printed else ""
        raise UserError(f"could not write {out}: {why}{where}") from None
