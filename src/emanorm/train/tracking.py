"""Experiment trackers behind ``RunLogger``: TensorBoard, MLflow and Weights & Biases.

Each tracker receives every scalar the run logs (``<kind>/<name>`` at its step), the resolved
config once as parameters, and at the end ``summary.json``, ``metrics.jsonl`` and
``config.yaml`` as artifacts. A run resumed with ``--resume`` writes into the same tracker run:
the ids are kept in ``RUN_DIR/trackers.json``. MLflow and W&B are optional extras
(``pip install 'emanorm[mlflow]'`` / ``'emanorm[wandb]'``), imported only when listed.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from torch.utils.tensorboard import SummaryWriter

from emanorm.errors import UserError
from emanorm.train.run_records import read_tracker_ids

log = logging.getLogger("emanorm")

IDS_FILE = "trackers.json"
#: How long the connection check before training waits for a tracking server (seconds).
CONNECT_TIMEOUT_S = 3.0
#: What ``wandb.Settings`` accepts as ``WANDB_MODE``; the online ones talk to a server.
WANDB_MODES = ("online", "offline", "shared", "disabled", "dryrun", "run")
WANDB_ONLINE_MODES = ("online", "shared", "run")
#: Characters W&B refuses in a project name.
WANDB_PROJECT_FORBIDDEN = "/\\#?%:"
#: MLflow's limit on a parameter value's length.
MLFLOW_PARAM_LIMIT = 6000


class Tracker(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def finish(self, artifacts: list[Path], status: str) -> None: ...


def optional_import(module: str, extra: str) -> Any:
    """Import an optional dependency, or a one-line UserError naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(
            f"--logger {extra} needs the {module} package: pip install 'emanorm[{extra}]'"
        ) from None


def flat_params(cfg: dict[str, Any]) -> dict[str, str]:
    """The config as flat ``key: text`` parameters (``method_args.threshold``)."""
    out: dict[str, str] = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": str(v) for k, v in value.items()})
        else:
            out[key] = str(value)
    return {k: v[:MLFLOW_PARAM_LIMIT] for k, v in out.items()}


class TensorBoardTracker:
    def __init__(self, run_dir: Path, resume_step: int) -> None:
        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step or None)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, artifacts: list[Path], status: str) -> None:
        self.writer.close()


class MLflowTracker:
    """A run of experiment ``$MLFLOW_EXPERIMENT_NAME`` (default ``emanorm``) in
    ``$MLFLOW_TRACKING_URI``, or in a file store at ``RUN_DIR/mlruns`` when that is unset
    (read it with ``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri RUN_DIR/mlruns``)."""

    def __init__(self, run_dir: Path, cfg: dict[str, Any], run_id: str | None) -> None:
        optional_import("mlflow", "mlflow")
        from mlflow.entities import Metric, Param  # the package is there: imported above
        from mlflow.tracking import MlflowClient

        self._metric = Metric
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        self.setting = f"MLFLOW_TRACKING_URI={uri}" if uri else f"the file store {run_dir / 'mlruns'}"
        if not uri:
            # MLflow 3 keeps its file store in maintenance mode behind this opt-in; it needs no
            # database packages and lives inside the run directory.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is not None and not self._run_exists(run_id):
            shown = run_id if run_id.isprintable() else repr(run_id)  # one line, whatever the file holds
            log.warning("warning: MLflow run %s named in %s is not in %s; starting a new run",
                        shown, run_dir / IDS_FILE, self.setting)
            run_id = None
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "emanorm")
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            run = self.client.create_run(experiment_id, run_name=run_dir.name)
            run_id = run.info.run_id
            params = [Param(k, v) for k, v in flat_params(cfg).items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                self.client.log_batch(run_id, params=params[start : start + 100])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def _run_exists(self, run_id: str) -> bool:
        """Whether the store holds ``run_id``; an id the store calls invalid (``not-a-run-id/../x``,
        an edited trackers.json) names no run either: a new run starts instead of the resume failing."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException as err:
            if getattr(err, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return False
            raise
        return True

    def log(self, scalars: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [self._metric(k, float(v), now, step) for k, v in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, artifacts: list[Path], status: str) -> None:
        for path in artifacts:
            if path.exists():
                self.client.log_artifact(self.run_id, str(path))
        ended = {"finished": "FINISHED", "stopped": "KILLED"}.get(status, "FAILED")
        self.client.set_terminated(self.run_id, status=ended)


class WandbTracker:
    """A run of project ``$WANDB_PROJECT`` (default ``emanorm``) under ``RUN_DIR/wandb``; offline
    (files to ``wandb sync`` later) when no API key is set and ``WANDB_MODE`` is not given."""

    def __init__(self, run_dir: Path, cfg: dict[str, Any], run_id: str | None) -> None:
        wandb = optional_import("wandb", "wandb")
        offline = not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE")
        self.setting = wandb_setting()
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "emanorm"),
            dir=str(run_dir),
            id=run_id,  # None: a new run (W&B picks the id)
            name=run_dir.name,
            resume="allow",
            config=cfg,
            mode="offline" if offline else None,
            settings=wandb.Settings(console="off", x_disable_stats=True, quiet=True),
        )
        self.run_id = self.run.id
        self.run_dir = run_dir

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def finish(self, artifacts: list[Path], status: str) -> None:
        for path in artifacts:  # W&B keeps the config itself, in a file of the same name
            if path.exists() and path.name != "config.yaml":
                self.run.save(str(path), base_path=str(path.parent), policy="now")
        self.run.finish(exit_code=0 if status == "finished" else 1)


def open_trackers(names: str, run_dir: Path, cfg: dict[str, Any], resume_step: int) -> list[Tracker]:
    """The trackers ``names`` lists (``jsonl`` is ``RunLogger``'s own file, always written)."""
    chosen = [name for name in names.split(",") if name]
    ids_file = run_dir / IDS_FILE
    ids = read_tracker_ids(ids_file) if resume_step > 0 and ids_file.exists() else {}
    trackers: list[Tracker] = []
    if "tensorboard" in chosen:
        with tracker_errors("tensorboard", f"the event files in {run_dir / 'tb'}", "start"):
            trackers.append(GuardedTracker("tensorboard", f"{run_dir / 'tb'}",
                                           TensorBoardTracker(run_dir, resume_step)))
    if "mlflow" in chosen:
        with tracker_errors("mlflow", mlflow_setting(run_dir), "start"):
            mlflow_tracker = MLflowTracker(run_dir, cfg, ids.get("mlflow"))
        trackers.append(GuardedTracker("mlflow", mlflow_tracker.setting, mlflow_tracker))
        ids["mlflow"] = mlflow_tracker.run_id
    if "wandb" in chosen:
        with tracker_errors("wandb", wandb_setting(), "start"):
            wandb_tracker = WandbTracker(run_dir, cfg, ids.get("wandb"))
        trackers.append(GuardedTracker("wandb", wandb_tracker.setting, wandb_tracker))
        ids["wandb"] = wandb_tracker.run_id
    if ids:
        try:
            ids_file.write_text(json.dumps(ids, indent=2) + "\n")
        except OSError as err:
            raise UserError(f"could not write {ids_file}: {err.strerror or err}") from None
    return trackers


# -- failing fast and in one line ------------------------------------------------------------------------
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception as one short line: its first non-empty line, without colour codes."""
    text = _ANSI.sub("", str(err)).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    first = first[:limit] + ("..." if len(first) > limit else "")
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


@contextlib.contextmanager
def tracker_errors(name: str, setting: str, when: str) -> Iterator[None]:
    """Turn any exception of a tracker into one ``UserError`` naming the tracker and its setting."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:  # MLflow, W&B and their HTTP clients raise many kinds
        raise UserError(f"--logger {name} failed to {when} ({setting}): {one_line(err)}") from None


class GuardedTracker:
    """A tracker whose ``log`` and ``finish`` fail as one ``UserError`` naming it and its setting."""

    def __init__(self, name: str, setting: str, tracker: Tracker) -> None:
        self.name, self.setting, self.tracker = name, setting, tracker

    def log(self, scalars: dict[str, float], step: int) -> None:
        with tracker_errors(self.name, self.setting, f"log step {step}"):
            self.tracker.log(scalars, step)

    def finish(self, artifacts: list[Path], status: str) -> None:
        with tracker_errors(self.name, self.setting, "finish its run"):
            self.tracker.finish(artifacts, status)


def mlflow_setting(run_dir: Path) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return f"MLFLOW_TRACKING_URI={uri}" if uri else f"the file store {run_dir / 'mlruns'}"


def wandb_setting() -> str:
    mode = os.environ.get("WANDB_MODE")
    project = os.environ.get("WANDB_PROJECT", "emanorm")
    return f"WANDB_MODE={mode or '(unset)'}, WANDB_PROJECT={project}"


def check_trackers(names: str) -> None:
    """Refuse tracker settings that cannot work, before training changes any file: the package,
    MLflow's experiment name and URI (scheme, a writable file store, a server that answers within
    :data:`CONNECT_TIMEOUT_S`), W&B's mode and project name (and its server when online)."""
    chosen = [name for name in names.split(",") if name]
    if "mlflow" in chosen:
        _check_mlflow()
    if "wandb" in chosen:
        _check_wandb()


def _reachable(url: str, tracker: str, setting: str) -> None:
    """A TCP connection to the server of ``url`` within :data:`CONNECT_TIMEOUT_S` (no request is sent)."""
    parsed = urlparse(url)
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError:
        raise UserError(f"--logger {tracker}: {setting} has an invalid port") from None
    if not parsed.hostname:
        raise UserError(f"--logger {tracker}: {setting} names no host")
    try:
        socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        why = "no answer" if isinstance(err, TimeoutError) else (err.strerror or one_line(err))
        raise UserError(
            f"--logger {tracker}: cannot reach {setting} ({why} within {CONNECT_TIMEOUT_S:g} s); "
            "start the server or change the setting"
        ) from None


def _mlflow_schemes() -> list[str]:
    try:  # the stores this MLflow installation can open (a private registry: fall back if it moves)
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        return [scheme for scheme in _tracking_store_registry._registry if scheme]
    except (ImportError, AttributeError):
        return ["file", "http", "https", "databricks", "sqlite", "postgresql", "mysql", "mssql"]


def _check_mlflow() -> None:
    optional_import("mlflow", "mlflow")
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if name is not None and not name.strip():
        raise UserError(
            "--logger mlflow: MLFLOW_EXPERIMENT_NAME is set but empty; name an experiment or unset it "
            "(experiment 'emanorm')"
        )
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return  # a file store inside the run directory
    setting = f"MLFLOW_TRACKING_URI={uri}"
    scheme = urlparse(uri).scheme
    if len(scheme) > 1 and scheme not in _mlflow_schemes():  # one letter: a Windows drive
        raise UserError(
            f"--logger mlflow: {setting} has the scheme {scheme!r}, which this MLflow cannot store runs "
            f"in; allowed: {', '.join(_mlflow_schemes())}"
        )
    if scheme in ("http", "https"):
        _reachable(uri, "mlflow", setting)
    elif scheme in ("", "file") or len(scheme) == 1:
        _check_store_directory(Path(urlparse(uri).path if scheme == "file" else uri), setting)


def _check_store_directory(store: Path, setting: str) -> None:
    """A file store is created on first use: its nearest existing folder must be a writable folder."""
    existing = store
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"--logger mlflow: {setting}: {existing} is not a directory")
    if not os.access(existing, os.W_OK):
        raise UserError(f"--logger mlflow: {setting}: {existing} is not writable (a read-only store)")


def _check_wandb() -> None:
    optional_import("wandb", "wandb")
    setting = wandb_setting()
    mode = os.environ.get("WANDB_MODE")
    if mode is not None and mode not in WANDB_MODES:
        raise UserError(
            f"--logger wandb: WANDB_MODE={mode!r} is not a W&B mode; allowed: {', '.join(WANDB_MODES)}"
        )
    project = os.environ.get("WANDB_PROJECT", "emanorm")
    forbidden = sorted(set(project) & set(WANDB_PROJECT_FORBIDDEN))
    if not project.strip() or len(project) > 128 or forbidden:
        raise UserError(
            f"--logger wandb: WANDB_PROJECT={project!r} is not a W&B project name (1 to 128 characters, "
            f"none of {' '.join(WANDB_PROJECT_FORBIDDEN)})"
        )
    online = mode in WANDB_ONLINE_MODES or (mode is None and bool(os.environ.get("WANDB_API_KEY")))
    if online:
        base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        _reachable(base, "wandb", f"{setting} (server {base})")
