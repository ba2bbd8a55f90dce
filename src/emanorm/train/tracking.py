"""Experiment trackers behind ``RunLogger``: TensorBoard, MLflow and Weights & Biases.

Each tracker receives every scalar the run logs (``<kind>/<name>`` at its step), the resolved
config once as parameters, and at the end ``summary.json``, ``metrics.jsonl`` and
``config.yaml`` as artifacts. A run resumed with ``--resume`` writes into the same tracker run:
the ids are kept in ``RUN_DIR/trackers.json``. MLflow and W&B are optional extras
(``pip install 'emanorm[mlflow]'`` / ``'emanorm[wandb]'``), imported only when listed.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path
from typing import Any, Protocol

from torch.utils.tensorboard import SummaryWriter

from emanorm.errors import UserError
from emanorm.train.run_records import read_tracker_ids

IDS_FILE = "trackers.json"
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
        if not uri:
            # MLflow 3 keeps its file store in maintenance mode behind this opt-in; it needs no
            # database packages and lives inside the run directory.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
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
        trackers.append(TensorBoardTracker(run_dir, resume_step))
    if "mlflow" in chosen:
        trackers.append(MLflowTracker(run_dir, cfg, ids.get("mlflow")))
        ids["mlflow"] = trackers[-1].run_id
    if "wandb" in chosen:
        trackers.append(WandbTracker(run_dir, cfg, ids.get("wandb")))
        ids["wandb"] = trackers[-1].run_id
    if ids:
        ids_file.write_text(json.dumps(ids, indent=2) + "\n")
    return trackers
