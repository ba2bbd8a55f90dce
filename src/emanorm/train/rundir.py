"""The run directory's policy: opening a run in it (lock, checks, ``--force``, resume), what a
finished run holds, and the files around the checkpoint (config.yaml, labeled_split.csv,
summary.json, curves.png).

A run directory holds one run: a second trainer is refused by its lock (``lock.run_directory``),
and a new run that would overwrite a started or finished one without ``--force``, or a
``--resume`` with a config that would change the run (``config.config_changes``), by
``lock.check_run_dir`` (torch-free: the command line asks it before it imports torch).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from emanorm.data import write_split_csv
from emanorm.errors import UserError
from emanorm.train import tracking
from emanorm.train.checkpoint import CHECKPOINT_NAME, os_error_reason, restore_checkpoint
from emanorm.train.config import dump_config
from emanorm.train.curves import write_run_curves
from emanorm.train.distributed import DistInfo, barrier
from emanorm.train.environment import machine_environment
from emanorm.train.hooks import TrainState
from emanorm.train.lock import check_run_dir, run_directory
from emanorm.train.recipe import Run, build_run

log = logging.getLogger("emanorm")

#: What ``--force`` removes before a new run (config.yaml and labeled_split.csv are rewritten).
REPLACED_BY_FORCE = ("checkpoints", "tb", "metrics.jsonl", "summary.json")


def checkpoint_path(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / CHECKPOINT_NAME


def interrupted_message(run_dir: Path) -> str:
    """What Ctrl-C leaves behind, in one line: the checkpoint kept and how to continue."""
    checkpoint_file = checkpoint_path(run_dir)
    if checkpoint_file.exists():
        return (f"interrupted; the last checkpoint is kept at {checkpoint_file}; continue with --resume "
                "(the steps after that checkpoint are trained again)")
    return "interrupted before the first checkpoint; nothing to resume (run the command again)"


def lock_and_check(held: contextlib.ExitStack, cfg: dict[str, Any], resume: bool, force: bool) -> None:
    """Take the run directory's lock (held until ``held`` closes), then :func:`check_run_dir`."""
    held.enter_context(run_directory(Path(cfg["out"])))
    check_run_dir(cfg, resume, force)
    tracking.check_trackers(cfg.get("logger", "jsonl,tensorboard"))  # before a file of the run changes


class RunFinished(Exception):
    """``--resume`` of a run whose summary.json exists: nothing to train (carries that summary)."""

    def __init__(self, summary: dict[str, Any]) -> None:
        super().__init__("the run is finished")
        self.summary = summary


def finished_run_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a finished run that ``--resume`` leaves untouched; ``None`` if unfinished.

    A finished run without its checkpoint is refused: retraining it would overwrite its results.
    """
    summary_file = run_dir / "summary.json"
    if not summary_file.exists():
        return None
    checkpoint_file = checkpoint_path(run_dir)
    if not checkpoint_file.exists():
        raise UserError(
            f"{run_dir} holds a finished run (summary.json) but {checkpoint_file} is missing, so there is "
            "nothing to resume; use --force to train it again from scratch"
        )
    try:
        summary = json.loads(summary_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {summary_file}: {err}; use --force to train it again") from None
    if not isinstance(summary, dict):
        raise UserError(f"{summary_file} is not a summary record; use --force to train it again")
    return summary


def claim_run_dir(run_dir: Path, resume: bool, force: bool) -> None:
    """Clear what ``--force`` replaces and make sure the directory is writable."""
    if force and not resume and run_dir.exists():
        for name in REPLACED_BY_FORCE:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    # a write killed mid-way leaves its temporary behind (the checkpoint itself is intact)
    for stale in (run_dir / "checkpoints").glob(f".{CHECKPOINT_NAME}.*.tmp"):
        stale.unlink(missing_ok=True)
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write to run directory {run_dir}: {err.strerror}") from None


def write_text(path: Path, text: str) -> None:
    """Write a small run file; a full disk or a read-only directory is one line naming the file."""
    try:
        path.write_text(text)
    except OSError as err:
        raise UserError(f"could not write {path}: {os_error_reason(err)}") from None


def write_run_files(run: Run, run_dir: Path) -> None:
    """config.yaml and labeled_split.csv: what the run is, written (again) at every start."""
    write_text(run_dir / "config.yaml", dump_config(run.cfg))
    try:
        write_split_csv(run.labeled, run_dir / "labeled_split.csv")
    except OSError as err:
        raise UserError(f"could not write {run_dir / 'labeled_split.csv'}: {os_error_reason(err)}") from None


def open_run(
    cfg: dict[str, Any], dist_info: DistInfo, resume: bool | str, force: bool
) -> tuple[Run, TrainState]:
    """Build the run, claim its directory, and put back its checkpoint when resuming (raises
    :class:`RunFinished` for ``resume`` of a finished run)."""
    run_dir = Path(cfg["out"])
    checkpoint_file = checkpoint_path(run_dir)
    if resume and not force:
        summary = finished_run_summary(run_dir)
        if summary is not None:
            log.info("%s is already finished (summary.json); nothing changed "
                     "(--resume --force evaluates it again)", run_dir)
            raise RunFinished(summary)
    resuming = resume and checkpoint_file.exists()
    run = build_run(cfg, dist_info, resuming=resuming)  # everything validated before a file changes
    if dist_info.is_main:
        claim_run_dir(run_dir, resume, force)
    barrier()
    state = TrainState()
    if resuming:
        position, elapsed = restore_checkpoint(run, checkpoint_file, force)
        state = TrainState(**position, elapsed=elapsed)
    elif resume:
        log.debug("--resume: no checkpoint in %s yet, starting from scratch", run_dir)
    if dist_info.is_main:
        write_run_files(run, run_dir)
    return run, state


def run_environment(run: Run) -> dict[str, Any]:
    """What the figures of a run depend on besides its config: the CPU thread count and the CPU's
    instruction set (``cpu_capability``) change floating-point results, so they are recorded with
    the CPU model, the torch version and the device."""
    return {
        "torch": str(torch.__version__),  # a plain str: TorchVersion does not unpickle safely
        "device": str(run.device),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "world_size": run.dist.world_size,
        **machine_environment(),
    }


def run_summary(
    run: Run,
    steps: int,
    seconds: float,
    final: dict[str, float],
    environment: dict[str, Any],
    collapse: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """summary.json's record: what was trained, how far, how long, the final evaluation and the
    collapse alarm if it sounded."""
    cfg = run.cfg
    summary = {
        "method": cfg["method"],
        "norm": cfg["norm"],
        "dataset": cfg["dataset"],
        "backbone": cfg["backbone"],
        "seed": cfg["seed"],
        "steps": steps,
        "epochs": run.total_epochs,
        "labeled": len(run.labeled),
        "unlabeled": len(run.stream.unlabeled.indices) if run.stream.unlabeled is not None else 0,
        "labeled_split_sha1": run.split_digest,
        "init_from": cfg["init_from"],
        "calibrate_bn_batches": cfg.get("calibrate_bn_batches", 0),
        "wall_clock_s": round(seconds, 1),
        "run_dir": str(Path(cfg["out"])),
        "final": final,
        "collapse": collapse,
        "environment": environment,
    }
    if run.warnings:
        summary["warnings"] = run.warnings
    return summary


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """summary.json (the run is finished once it exists) and curves.png."""
    write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_run_curves(run_dir)
