"""The one training loop every method runs on: iterate, checkpoint, log.

Everything a run is made of comes from the recipe (``build_run``); evaluation along training is a
callback (``monitor``). Read top to bottom: ``train_step`` is one optimisation step, ``train`` the
whole run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from emanorm.data import write_split_csv
from emanorm.errors import UserError
from emanorm.train import checkpoint as ckpt
from emanorm.train.config import comparable, dump_config
from emanorm.train.curves import write_run_curves
from emanorm.train.distributed import average_batchnorm_statistics, barrier, cleanup, init_distributed
from emanorm.train.recipe import Run, build_run, load_method

log = logging.getLogger("emanorm")

#: ``monitor(method, run) -> {name: value}``: evaluation along training
#: (``emanorm.evaluation.knn_monitor`` for ``emanorm train``).
Monitor = Callable[[nn.Module, Run], dict[str, float]]


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def train_step(
    step_fn: Callable[[dict[str, torch.Tensor], int], tuple[torch.Tensor, dict[str, Any]]] | None,
    method: nn.Module,
    batch: dict[str, torch.Tensor],
    step: int,
    total_steps: int,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    amp: Callable[[], Any] = contextlib.nullcontext,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One optimisation step exactly as ``emanorm train`` runs it, for loops of your own.

    ``step_fn`` runs ``method.training_step`` (the method itself, its DDP wrapper or a compiled
    version; ``None``: the method). Forward under ``amp``, a finite-loss check, backward (scaled
    with ``scaler``), the optimizer step, a finite-weights check, the scheduler step, the
    BN-statistics all-reduce across ranks, then ``method.after_step`` (the teacher update).
    Returns the loss and the method's logs; raises :class:`NonFiniteLossError` before the teacher
    moves.
    """
    with amp():
        loss, logs = (step_fn or method)(batch, step)
    if not torch.isfinite(loss.detach()).all():
        raise NonFiniteLossError(f"loss is {loss.item()} at step {step}")
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    # A finite loss can still step into non-finite weights (a huge lr): stop before the teacher
    # copies them and before any checkpoint holds them.
    params = [p.detach() for group in optimizer.param_groups for p in group["params"]]
    if params and not torch.isfinite(torch.stack(torch._foreach_norm(params))).all():
        raise NonFiniteLossError(
            f"parameters became non-finite at step {step}; the loss was {loss.item():.4g}"
        )
    scheduler.step()
    average_batchnorm_statistics(method)
    method.after_step(step, total_steps)
    return loss, logs


# -- the run directory ----------------------------------------------------------------------------
def default_run_dir(cfg: dict[str, Any]) -> str:
    return f"runs/{cfg['method']}-{cfg['norm']}-{cfg['dataset']}-s{cfg['seed']}"


def check_run_dir(cfg: dict[str, Any], resume: bool, force: bool) -> Path:
    """Refuse a run directory that this command must not write to; changes nothing on disk."""
    run_dir = Path(cfg["out"])
    config_file = run_dir / "config.yaml"
    finished = (run_dir / "summary.json").exists()
    started = (run_dir / "checkpoints" / ckpt.CHECKPOINT_NAME).exists() or config_file.exists()
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} exists and is not a directory")
    if resume and config_file.exists() and not force:
        try:
            previous = yaml.safe_load(config_file.read_text()) or {}
        except yaml.YAMLError:
            raise UserError(f"{config_file} is not valid YAML; use --force to start over") from None
        old, new = comparable(previous), comparable(cfg)
        differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if differ:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:5])
            raise UserError(f"--resume with a different config ({details}); use --force to override")
    elif not resume and (finished or started) and not force:
        state = "a finished run" if finished else "an unfinished run"
        raise UserError(f"{run_dir} already holds {state}; use --resume to continue or --force to overwrite")
    return run_dir


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
    checkpoint_file = run_dir / "checkpoints" / ckpt.CHECKPOINT_NAME
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


def remove_unstarted_run_dir(run_dir: Path, created: bool, checkpoint_file: Path) -> None:
    """After a failure before the first checkpoint, remove the run directory this command created,
    so that no empty run is left behind (there is nothing to resume in it)."""
    if created and not checkpoint_file.exists() and run_dir.is_dir():
        shutil.rmtree(run_dir, ignore_errors=True)


def run_environment(run: Run) -> dict[str, Any]:
    """What the figures of a run depend on besides its config: the CPU thread count changes
    floating-point results, so it is recorded with the torch version and the device."""
    return {
        "torch": torch.__version__,
        "device": str(run.device),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "world_size": run.dist.world_size,
    }


def light_run(run: Run) -> Run:
    """The run as the evaluations along training see it: with ``eval_light_size`` set, a kNN bank
    and test queries of at most that many images (the final evaluation uses the full sizes)."""
    size = run.cfg.get("eval_light_size")
    if not size:
        return run
    bank = min(run.cfg["knn_bank_size"], size)
    queries = size if run.cfg["monitor_test_size"] is None else min(run.cfg["monitor_test_size"], size)
    return dataclasses.replace(run, cfg={**run.cfg, "knn_bank_size": bank, "monitor_test_size": queries})


def format_results(results: dict[str, Any]) -> str:
    """``knn_teacher 80.46, ..., knn_k 20, knn_bank 10000``: floats with 2 decimals, counts as integers."""
    return ", ".join(
        f"{k} {v}" if isinstance(v, int) or not isinstance(v, float) else f"{k} {v:.2f}"
        for k, v in results.items()
    )


def claim_run_dir(run_dir: Path, resume: bool, force: bool) -> None:
    """Clear what ``--force`` replaces and make sure the directory is writable."""
    if force and not resume and run_dir.exists():
        for name in ("checkpoints", "tb", "metrics.jsonl", "summary.json"):
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write to run directory {run_dir}: {err.strerror}") from None


class RunLogger:
    """metrics.jsonl (one record per line) and TensorBoard events, on the main process."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if resume_step > 0 and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [line for line in kept if json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step or None)

    def record(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                if key not in ("step", "epoch", "kind") and numeric:
                    self.writer.add_scalar(f"{record.get('kind', 'train')}/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# -- checkpoints ----------------------------------------------------------------------------------------
def write_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Atomic write; a full disk or a vanished directory is a clear error and the old file stays."""
    try:
        ckpt.atomic_save(state, path)
    except OSError as err:
        raise UserError(
            f"could not write checkpoint {path}: {err.strerror or err}; the previous checkpoint is intact"
        ) from None


def save_checkpoint(run: Run, path: Path, position: dict[str, int], elapsed: float) -> None:
    """Every rank's RNG state gathered; rank 0 writes the weights, optimizer, schedule and position."""
    rngs = [ckpt.rng_state()]
    if run.dist.distributed:
        gathered: list[Any] = [None] * run.dist.world_size
        dist.all_gather_object(gathered, rngs[0])
        rngs = gathered
    if not run.dist.is_main:
        return
    state = {
        "format": 1,
        "config": run.cfg,
        "dataset_info": asdict(run.info),
        "method": run.method.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        **position,  # epoch, step_in_epoch, global_step
        "elapsed": elapsed,
        "rng": rngs,
        "labeled_indices": run.labeled.cpu(),
    }
    write_checkpoint(state, path)


def restore_checkpoint(run: Run, path: Path) -> tuple[dict[str, int], float]:
    """Load a checkpoint into the run; returns its position and elapsed seconds."""
    state = ckpt.safe_load(path, map_location=run.device)
    ckpt.load_matching(run.method, state["method"], f"checkpoint {path}")
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    rngs = state["rng"]
    ckpt.set_rng_state(rngs[run.dist.rank] if run.dist.rank < len(rngs) else rngs[0])
    if not torch.equal(state["labeled_indices"].cpu(), run.labeled.cpu()):
        raise UserError("the labeled split differs from the checkpoint's; was the dataset changed?")
    position = {k: state[k] for k in ("epoch", "step_in_epoch", "global_step")}
    log.info("resumed from %s at step %d (epoch %d)", path, position["global_step"], position["epoch"])
    return position, state.get("elapsed", 0.0)


# -- the loop -----------------------------------------------------------------------------------------
def train(
    cfg: dict[str, Any],
    *,
    monitor: Monitor | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    return_method: bool = False,
) -> Any:
    """Run (or continue) the training a resolved config describes.

    ``monitor(method, run)`` evaluates along training (every ``eval_every`` epochs and at the end;
    ``emanorm train`` passes ``emanorm.evaluation.knn_monitor``); without one nothing is
    evaluated and the summary's ``final`` is empty. Returns the summary, or
    ``(summary, method)`` with ``return_method``.

    ``resume`` on a finished run (summary.json present) changes nothing and returns its summary
    (refused if its checkpoint is missing); with ``force`` as well, its final evaluation runs again.
    """
    dist_info = init_distributed(cfg["device"])
    try:
        try:
            summary, method = _train(cfg, dist_info, monitor, resume, force, progress)
        except RunFinished as finished:
            summary = finished.summary
            method = load_method(Path(cfg["out"]))[0] if return_method else None
        return (summary, method) if return_method else summary
    finally:
        cleanup()


def _train(
    cfg: dict[str, Any], dist_info: Any, monitor: Monitor | None, resume: bool, force: bool, progress: bool
) -> tuple[dict[str, Any], nn.Module]:
    if cfg["out"] is None:
        cfg["out"] = default_run_dir(cfg)
    run_dir = check_run_dir(cfg, resume, force) if dist_info.is_main else Path(cfg["out"])
    checkpoint_file = run_dir / "checkpoints" / ckpt.CHECKPOINT_NAME
    if resume and not force:
        summary = finished_run_summary(run_dir)
        if summary is not None:
            log.info("%s is already finished (summary.json); nothing changed "
                     "(--resume --force evaluates it again)", run_dir)
            raise RunFinished(summary)
    resuming = resume and checkpoint_file.exists()
    run = build_run(cfg, dist_info, resuming=resuming)
    created = not run_dir.exists()
    if dist_info.is_main:
        claim_run_dir(run_dir, resume, force)
    barrier()
    try:
        return _run_loop(cfg, run, run_dir, checkpoint_file, monitor, resume, resuming, progress)
    except BaseException:
        if dist_info.is_main:
            remove_unstarted_run_dir(run_dir, created, checkpoint_file)
        raise


def _run_loop(
    cfg: dict[str, Any], run: Run, run_dir: Path, checkpoint_file: Path, monitor: Monitor | None,
    resume: bool, resuming: bool, progress: bool,
) -> tuple[dict[str, Any], nn.Module]:
    method, dist_info = run.method, run.dist
    environment = run_environment(run)

    position, elapsed = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}, 0.0
    if resuming:
        position, elapsed = restore_checkpoint(run, checkpoint_file)
    elif resume:
        log.debug("--resume: no checkpoint in %s yet, starting from scratch", run_dir)
    epoch, step_in_epoch, global_step = position["epoch"], position["step_in_epoch"], position["global_step"]
    if dist_info.is_main:
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        write_split_csv(run.labeled, run_dir / "labeled_split.csv")
    logger = RunLogger(run_dir, dist_info.is_main, global_step)
    name = f"{cfg['method']}-{cfg['norm']}"
    bar = tqdm(
        total=run.total_steps, initial=global_step, desc=name, unit="step",
        disable=not (progress and dist_info.is_main),
    )
    # without a bar, a line at every tenth of the steps (and one per evaluation) shows progress
    report_every = 0 if progress or not dist_info.is_main else max(1, run.total_steps // 10)

    def evaluate(final: bool) -> dict[str, float]:
        if monitor is None or not dist_info.is_main:
            barrier()
            return {}
        kind = "final evaluation" if final else "evaluation"
        if bar.disable:
            log.info("step %d/%d: %s ...", global_step, run.total_steps, kind)
        else:
            bar.set_description_str(f"{name} [{kind}]", refresh=True)
        eval_started = time.perf_counter()
        results = monitor(method, run if final else light_run(run))
        seconds = time.perf_counter() - eval_started
        if not bar.disable:
            bar.unpause()  # the evaluation's time is charged neither to the elapsed time nor to the rate
            bar.set_description_str(name, refresh=False)
        if results:
            light = not final and light_run(run) is not run
            logger.record({"kind": "eval", "step": global_step, "epoch": epoch, **results,
                           "eval_s": round(seconds, 1), "light": light})
            shown = format_results(results)
            bar.write(f"step {global_step} epoch {epoch}: {shown} ({kind}, {seconds:.0f} s)")
        barrier()
        return results

    def checkpoint() -> None:
        where = {"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step}
        save_checkpoint(run, checkpoint_file, where, elapsed + time.perf_counter() - started)

    started = time.perf_counter()
    window_start, window_images = time.perf_counter(), 0
    last_eval: dict[str, float] = {}
    method.train()
    while global_step < run.total_steps:
        run.stream.set_epoch(epoch, step_in_epoch)
        for batch in run.stream:
            try:
                loss, logs = train_step(
                    run.step_fn, method, batch, global_step, run.total_steps, run.optimizer, run.scheduler,
                    amp=run.amp, scaler=run.scaler,
                )
            except NonFiniteLossError as err:
                raise NonFiniteLossError(
                    f"{err}; stopped, the last good checkpoint is kept at {checkpoint_file}"
                ) from None
            global_step += 1
            step_in_epoch += 1
            window_images += sum(v.shape[0] for v in batch.values() if v.dim() == 4)
            if global_step % cfg["log_every"] == 0 or global_step == run.total_steps:
                seconds = max(time.perf_counter() - window_start, 1e-9)
                record = {"kind": "train", "step": global_step, "epoch": epoch, "loss": float(loss.detach())}
                record.update({k: float(v) for k, v in logs.items()})
                record["lr"] = run.optimizer.param_groups[0]["lr"]
                record["img_per_s"] = window_images / seconds
                logger.record(record)
                window_start, window_images = time.perf_counter(), 0
                shown = {"loss": f"{record['loss']:.3f}", "img/s": f"{record['img_per_s']:.0f}"}
                if "mask" in record:
                    shown["mask"] = f"{record['mask']:.2f}"
                bar.set_postfix(shown, refresh=False)
            bar.update(1)
            if report_every and (global_step % report_every == 0 or global_step == run.total_steps):
                log.info("step %d/%d, loss %.4f", global_step, run.total_steps, float(loss.detach()))
            if cfg["checkpoint_every_steps"] and global_step % cfg["checkpoint_every_steps"] == 0:
                checkpoint()
            if global_step >= run.total_steps:
                break
        epoch_done = step_in_epoch >= run.steps_per_epoch
        if epoch_done:
            epoch, step_in_epoch = epoch + 1, 0
        finished = global_step >= run.total_steps
        if finished or (cfg["eval_every"] and epoch_done and epoch % cfg["eval_every"] == 0):
            last_eval = evaluate(final=finished)
        checkpoint()
    bar.close()
    if not last_eval:  # resumed a run that had already finished its steps
        last_eval = monitor(method, run) if monitor is not None and dist_info.is_main else {}
    logger.close()

    summary = {
        "method": cfg["method"],
        "norm": cfg["norm"],
        "dataset": cfg["dataset"],
        "backbone": cfg["backbone"],
        "seed": cfg["seed"],
        "steps": global_step,
        "epochs": run.total_epochs,
        "labeled": len(run.labeled),
        "labeled_split_sha1": run.split_digest,
        "init_from": cfg["init_from"],
        "wall_clock_s": round(elapsed + time.perf_counter() - started, 1),
        "run_dir": str(run_dir),
        "final": last_eval,
        "environment": environment,
    }
    if dist_info.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        write_run_curves(run_dir)
    barrier()
    return summary, method
