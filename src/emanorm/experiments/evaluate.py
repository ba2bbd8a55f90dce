"""Evaluating the runs of a grid with the protocol that fits each method.

- semi-supervised runs (``fixmatch``, ``meanteacher``, ``supervised``): test accuracy of the
  evaluated network, as the trainer measured it at the end of training (``summary.json``);
- self-supervised runs (``moco``, ``byol``, ``dino``): kNN accuracy (from ``summary.json``) and a linear probe
  on frozen features with a fraction of the training labels (10% as in the paper's Table 1).

Every accuracy here is a **percentage** (0-100), as in the trainer's metrics; the evaluation
library's fractions are converted.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from emanorm.data import build_augmentation, load_dataset, select_labeled
from emanorm.errors import UserError
from emanorm.evaluation.context import frozen_features
from emanorm.evaluation.features import resolve_device
from emanorm.evaluation.protocols import probe_label_subsets
from emanorm.evaluation.settings import DEFAULT_LINEAR_LRS, LinearSettings
from emanorm.experiments.grid import RunSpec
from emanorm.train import load_backbone
from emanorm.train.config import SEMI_SUPERVISED

log = logging.getLogger("emanorm")


@dataclass(frozen=True)
class LinearProtocol:
    """The linear-probe protocol of a grid's self-supervised runs: which labels, which network, and
    the probe's settings (``emanorm.evaluation.LinearProtocol``)."""

    fraction: float = 0.1
    epochs: int = 50
    # the library's whole grid: cheap on a CPU, the classifier trains on features computed once
    lrs: tuple[float, ...] = DEFAULT_LINEAR_LRS
    batch_size: int = 256
    label_seed: int = 0  # the same labeled subset for every run: only the pre-training differs
    which: str = "teacher"

    def probe(self, device: Any) -> LinearSettings:
        """The library's settings for this protocol's linear probe."""
        return LinearSettings(lrs=self.lrs, epochs=self.epochs, batch_size=self.batch_size,
                             seed=self.label_seed, device=device, progress=False)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["lrs"] = list(self.lrs)
        return data


def is_semi_supervised(method: str) -> bool:
    return method in SEMI_SUPERVISED


class DatasetCache:
    """Each (dataset, split) is loaded once per invocation, shared by every run's evaluation."""

    def __init__(self) -> None:
        self._items: dict[tuple[Any, ...], Any] = {}

    def get(self, cfg: dict[str, Any], split: str) -> Any:
        key = (cfg["dataset"], split, cfg.get("data_dir"), cfg.get("image_size"))
        if key not in self._items:
            try:
                self._items[key] = load_dataset(
                    cfg["dataset"],
                    split,
                    data_dir=cfg.get("data_dir"),
                    image_size=cfg.get("image_size"),
                    on_corrupt=cfg.get("on_corrupt", "error"),
                )
            except (ValueError, FileNotFoundError, RuntimeError) as err:
                raise UserError(f"cannot load split {split!r} of {cfg['dataset']!r}: {err}") from None
        return self._items[key]


def linear_probe_run(
    run_dir: Path, settings: LinearProtocol, datasets: DatasetCache, device: str = "auto"
) -> dict[str, Any]:
    """Linear probe of a finished run's frozen backbone: top-1/top-5 in percent and the details."""
    started = time.perf_counter()
    backbone, cfg = load_backbone(run_dir, settings.which)
    train_set = datasets.get(cfg, "train")
    test_set = datasets.get(cfg, "test")  # "test" names the held-out split of every dataset (ImageNet: val)
    info = train_set.info
    torch_device = resolve_device(device)
    backbone.to(torch_device)
    try:
        labeled = select_labeled(
            train_set.targets, info.num_classes, fraction=settings.fraction, seed=settings.label_seed
        )
    except ValueError as err:
        msg = f"cannot draw {settings.fraction:g} of the labels of {cfg['dataset']}: {err}"
        raise UserError(msg) from None

    test_idx = torch.nonzero(torch.as_tensor(test_set.targets) >= 0).flatten()
    transform = build_augmentation("none", info)

    def features(dataset: Any, indices: torch.Tensor, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        return frozen_features(backbone, dataset, indices, torch_device, transform=transform, desc=desc)

    try:  # the same workflow as `emanorm eval linear`, on one labeled subset
        (result,) = probe_label_subsets(
            backbone, train_set, [labeled], test_set, test_idx, num_classes=info.num_classes,
            probe=settings.probe(device=torch_device), seeds=[None], features=features,
        )
    except UserError as err:
        raise UserError(f"linear probe of {run_dir}: {err}") from None
    return {
        "top1": 100.0 * float(result["top1"]),
        "top5": 100.0 * float(result["top5"]),
        "best_lr": result["best_lr"],
        "diverged": result["diverged"],
        "num_train": result["num_train"],
        "num_test": result["num_test"],
        "seconds": round(time.perf_counter() - started, 1),
    }


def cached_linear_probe(
    spec: RunSpec, summary: dict[str, Any], settings: LinearProtocol, datasets: DatasetCache, device: str
) -> dict[str, Any]:
    """The probe result kept in ``RUN_DIR/compare_linear.json``; recomputed only when the settings
    or the run (its step count or wall-clock) changed."""
    cache = spec.run_dir / "compare_linear.json"
    key = {"settings": settings.as_dict(), "steps": summary.get("steps"), "wall": summary.get("wall_clock_s")}
    if cache.exists():
        try:
            stored = json.loads(cache.read_text())
            if stored.get("key") == key:
                return stored["result"]
        except (ValueError, KeyError, AttributeError, RecursionError):
            pass  # a torn or foreign file: recompute it
    result = linear_probe_run(spec.run_dir, settings, datasets, device)
    cache.write_text(json.dumps({"key": key, "result": result}, indent=2) + "\n")
    return result


def read_curve(run_dir: Path, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every eval record of ``metrics.jsonl`` that holds ``key``."""
    path = run_dir / "metrics.jsonl"
    points: list[tuple[int, float]] = []
    if not path.exists():
        return points
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue  # a line cut by a kill
        if not isinstance(record, dict):
            continue
        if record.get("kind") == "eval" and isinstance(record.get(key), (int, float)):
            points.append((int(record["step"]), float(record[key])))
    return points


def run_identity(spec: RunSpec) -> dict[str, Any]:
    """What a run is in the grid: row label, column, the method it trains, its norm and seed."""
    cfg = spec.config
    return {
        "variant": spec.variant,
        "method": spec.method,
        "run_method": cfg["method"],
        "norm": cfg["norm"],
        "seed": spec.seed,
    }


def evaluate_run(
    spec: RunSpec,
    *,
    which: str = "teacher",
    linear: LinearProtocol | None = None,
    datasets: DatasetCache | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """One run's raw entry for ``results.json``: identity, status, metrics (percent), wall-clock, curve."""
    cfg = spec.config
    entry: dict[str, Any] = {
        "name": spec.name,
        **run_identity(spec),
        "run_dir": str(spec.run_dir),
        "status": "missing",
        "metrics": {},
    }
    if not spec.summary_path.exists():
        return entry
    try:
        summary = json.loads(spec.summary_path.read_text())
        if not isinstance(summary, dict):
            raise ValueError(f"a {type(summary).__name__}, not an object")
    except (OSError, ValueError, RecursionError) as err:
        entry.update(status="failed", error=f"unreadable summary.json: {err}")
        return entry
    final = summary.get("final") or {}
    metrics: dict[str, float] = {}
    if f"knn_{which}" in final:
        metrics["knn"] = float(final[f"knn_{which}"])
    semi = is_semi_supervised(cfg["method"])
    if semi and f"test_acc_{which}" in final:
        metrics["test_acc"] = float(final[f"test_acc_{which}"])
    entry.update(
        status="ok",
        protocol=expected_protocol(cfg["method"], linear),
        final=final,
        steps=summary.get("steps"),
        epochs=summary.get("epochs"),
        labeled=summary.get("labeled"),
        calibrate_bn_batches=summary.get("calibrate_bn_batches"),  # None: a run from before the option
        wall_clock_s=summary.get("wall_clock_s"),
        test_images=cfg.get("monitor_test_size") or "all",
        curve=read_curve(spec.run_dir, f"knn_{which}"),
        budget=planned_budget(cfg),
    )
    if not semi and linear is not None:
        try:
            probe = cached_linear_probe(spec, summary, linear, datasets or DatasetCache(), device)
        except UserError as err:
            entry.update(status="failed", error=f"linear probe: {err}")
        except Exception as err:  # one run's probe must not cost the report of all the others
            log.warning("linear probe of %s failed", spec.run_dir, exc_info=True)
            entry.update(status="failed", error=f"linear probe: {type(err).__name__}: {err}")
        else:
            metrics["linear_top1"] = probe["top1"]
            metrics["linear_top5"] = probe["top5"]
            entry["linear"] = {**linear.as_dict(), **probe}
    entry["metrics"] = metrics
    primary_key = {"test_acc": "test_acc", "linear": "linear_top1", "knn": "knn"}[entry["protocol"]]
    if primary_key in metrics:
        entry["primary"] = metrics[primary_key]
    return entry


# -- runs reported from an earlier results.json ------------------------------------------------------


def planned_budget(cfg: dict[str, Any]) -> dict[str, int]:
    """A run's budget as configured: ``{"max_steps": N}`` or ``{"epochs": E}``."""
    return {"max_steps": cfg["max_steps"]} if cfg.get("max_steps") else {"epochs": cfg["epochs"]}


def expected_protocol(method: str, linear: LinearProtocol | None) -> str:
    """How compare scores a run of ``method``: ``test_acc``, ``linear`` or ``knn``."""
    return "test_acc" if is_semi_supervised(method) else ("linear" if linear else "knn")


#: Scores in percent: a merged entry's accuracies must lie in [0, 100].
PERCENT_METRICS = ("knn", "test_acc", "linear_top1", "linear_top5")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def merged_entry_problem(entry: dict[str, Any]) -> str | None:
    """What makes a finished entry of a results.json unusable in a report (None: nothing): every
    field the tables and the curves read, checked before ``compare`` trains or writes anything."""
    for key in ("variant", "method"):
        if not isinstance(entry.get(key), str):
            return f"{key} is {entry.get(key)!r}, not a text"
    if not isinstance(entry.get("seed"), int) or isinstance(entry.get("seed"), bool):
        return f"seed is {entry.get('seed')!r}, not an integer"
    metrics = entry.get("metrics", {})
    if not isinstance(metrics, dict):
        return f"metrics is a {type(metrics).__name__}, not a mapping"
    scores = {"primary": entry.get("primary"), **{f"metrics.{k}": v for k, v in metrics.items()}}
    for key, value in scores.items():
        if not _finite(value):
            return f"{key} is {value!r}, not a finite number"
        if (key == "primary" or key.removeprefix("metrics.") in PERCENT_METRICS) and not 0 <= value <= 100:
            return f"{key} is {value!r}: an accuracy in percent lies in [0, 100]"
    wall = entry.get("wall_clock_s")
    if wall is not None and not (_finite(wall) and wall >= 0):
        return f"wall_clock_s is {wall!r}, not a number of seconds >= 0"
    curve = entry.get("curve")
    if curve is not None and not (isinstance(curve, list) and all(
        isinstance(p, list) and len(p) == 2 and isinstance(p[0], int) and not isinstance(p[0], bool)
        and _finite(p[1]) and 0 <= p[1] <= 100 for p in curve
    )):
        return "curve is not a list of [step, accuracy in [0, 100]] pairs"
    return None


class MergedResults:
    """Finished runs taken from earlier ``results.json`` files (``compare --merge-results``).

    A grid can be trained in parts (seeds 0-1 on one machine, 2-4 on another, or a table that
    grows over sessions) and reported as one. A run is taken from a file only when it is not
    finished in this grid's own ``--out``; it is then not trained here. The entry must agree with
    the planned run on its identity (row label, column, seed), its normalization and method, its
    budget and how it was scored (test accuracy, linear probe with the same settings, or kNN).
    """

    def __init__(
        self, paths: list[str] | tuple[str, ...], *, which: str, linear: LinearProtocol | None
    ) -> None:
        self.linear = linear
        self.entries: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        seen: set[Path] = set()
        for path in paths:
            if Path(path).resolve() in seen:
                continue  # the same file named twice
            seen.add(Path(path).resolve())
            record = self._read(Path(path))
            if record["which"] != which:
                raise UserError(
                    f"--merge-results {path} evaluated the {record['which']} (--which); this grid the {which}"
                )
            for number, entry in enumerate(record["runs"]):
                if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                    raise UserError(
                        f"--merge-results {path}: run #{number} has no name; not a compare record"
                    )
                if entry.get("status") == "ok" and entry.get("primary") is not None:
                    problem = merged_entry_problem(entry)
                    if problem:
                        raise UserError(
                            f"--merge-results {path}: run #{number} ({entry['name']}): {problem}; "
                            "nothing was written"
                        )
                    self.entries.setdefault(entry["name"], []).append((path, entry))
                # anything else (failed, missing, unscored) is not finished there: it trains here;
                # a finished entry is checked whole, so no bad value reaches a table or a file

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"--merge-results {path}: no such file") from None
        except (OSError, ValueError, RecursionError) as err:  # ValueError: bad JSON or not UTF-8
            reason = "nested too deeply" if isinstance(err, RecursionError) else err
            raise UserError(f"--merge-results {path}: not readable as JSON ({reason})") from None
        if not isinstance(record, dict) or not isinstance(record.get("runs"), list) or "which" not in record:
            raise UserError(f"--merge-results {path}: not a results.json of emanorm compare")
        return record

    def covers(self, spec: RunSpec) -> bool:
        """Whether ``spec`` is reported from a file instead of trained: in a file, not finished here."""
        return spec.name in self.entries and spec.state() != "finished"

    @staticmethod
    def _origins(sources: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
        """``sources`` less the copies: a report that merged a file given here too holds the same
        run again, marked ``merged_from`` that file. The copy is dropped when it reports the same
        result as its origin, so both files can be merged and the run keeps its first source."""
        given = {Path(path).resolve(): entry for path, entry in sources}

        def is_copy(entry: dict[str, Any]) -> bool:
            source = entry.get("merged_from")
            origin = given.get(Path(source).resolve()) if isinstance(source, str) else None
            return origin is not None and origin is not entry and all(
                entry.get(k) == origin.get(k) for k in ("primary", "metrics", "seed", "norm", "method")
            )

        return [(path, entry) for path, entry in sources if not is_copy(entry)]

    def entry(self, spec: RunSpec) -> dict[str, Any]:
        """The file's entry for ``spec``, checked against the planned run, marked with its source."""
        sources = self._origins(self.entries[spec.name])
        if len(sources) > 1:
            raise UserError(
                f"run {spec.name} is in several --merge-results: {', '.join(p for p, _ in sources)}"
            )
        path, entry = sources[0]
        cfg = spec.config
        expected = {**run_identity(spec), "protocol": expected_protocol(cfg["method"], self.linear)}
        budget = planned_budget(cfg)
        if "budget" in entry:
            expected["budget"] = budget
        elif "max_steps" in budget:  # files written before entries recorded their budget
            expected["steps"] = budget["max_steps"]
        else:
            expected["epochs"] = budget["epochs"]
        if "calibrate_bn_batches" in entry:  # recorded since 2026-12-06; older entries cannot be checked
            expected["calibrate_bn_batches"] = cfg.get("calibrate_bn_batches", 0)
        differ = sorted(k for k, v in expected.items() if entry.get(k) != v)
        if differ:
            diffs = ", ".join(f"{k}: {entry.get(k)!r} there, {expected[k]!r} here" for k in differ)
            hint = (" (--set calibrate_bn_batches=N plans the start it was trained with)"
                    if "calibrate_bn_batches" in differ else "")
            raise UserError(
                f"--merge-results {path}: {spec.name} is not the run this grid plans ({diffs}){hint}"
            )
        if expected["protocol"] == "linear":
            assert self.linear is not None
            theirs = entry.get("linear") if isinstance(entry.get("linear"), dict) else {}
            ours = self.linear.as_dict()
            differ = sorted(k for k in ours if theirs.get(k) != ours[k])
            if differ:
                diffs = ", ".join(f"{k}: {theirs.get(k)!r} there, {ours[k]!r} here" for k in differ)
                raise UserError(f"--merge-results {path}: {spec.name} used another linear probe ({diffs})")
        return {**entry, "merged_from": path}
