"""The one training loop every method runs on: iterate, checkpoint, log.

Everything a run is made of comes from the recipe (``build_run``); evaluation along training is a
callback (``monitor``). Read top to bottom: ``train_step`` is one optimisation step, ``train`` the
whole run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
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
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from emanorm.collapse import CollapseWatch
from emanorm.data import write_split_csv
from emanorm.errors import UserError
from emanorm.train import checkpoint as ckpt
from emanorm.train import tracking
from emanorm.train.config import comparable, dump_config
from emanorm.train.curves import read_metrics, write_run_curves
from emanorm.train.distributed import (
    DistInfo,
    average_batchnorm_statistics,
    barrier,
    cleanup,
    init_distributed,
    peer_failure_message,
)

# torch-free, so the command line refuses a busy, started or finished --out before torch loads
from emanorm.train.lock import check_run_dir, default_run_dir, run_directory
from emanorm.train.preemption import RESUMABLE_EXIT, Preempted, StopSignals
from emanorm.train.recipe import Run, build_run, load_method

log = logging.getLogger("emanorm")

#: ``monitor(method, run) -> {name: value}``: evaluation along training
#: (``emanorm.evaluation.knn_monitor`` for ``emanorm train``).
Monitor = Callable[[nn.Module, Run], dict[str, float]]


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite (one fused norm per tensor group)."""
    return not tensors or bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all())


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
    accumulate: int = 1,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One optimisation step exactly as ``emanorm train`` runs it, for loops of your own.

    ``step_fn`` runs ``method.training_step`` (the method itself, its DDP wrapper or a compiled
    version; ``None``: the method). Forward under ``amp``, a finite-loss check, backward (scaled
    with ``scaler``), the optimizer step, a finite-weights check, the scheduler step, the
    BN-statistics all-reduce across ranks, then ``method.after_step`` (the teacher update).
    Returns the loss and the method's logs; raises :class:`NonFiniteLossError` before the teacher
    moves.

    ``accumulate`` N > 1 splits ``batch`` into N equal micro-batches and sums their gradients
    (each loss divided by N) before the one optimizer step; everything after the backward runs
    once, at this real step (see :func:`accumulate_gradients`).
    """
    if accumulate > 1:
        loss, logs = accumulate_gradients(step_fn, method, batch, step, optimizer, amp, scaler, accumulate)
    else:
        with amp():
            loss, logs = (method if step_fn is None else step_fn)(batch, step)
        if not torch.isfinite(loss.detach()).all():
            raise NonFiniteLossError(f"loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    # A finite loss can still step into non-finite weights or BN statistics (a huge lr): stop
    # before the teacher copies them and before any checkpoint holds them.
    params = [p.detach() for group in optimizer.param_groups for p in group["params"]]
    buffers = [b for b in method.buffers() if b.is_floating_point()]
    if not all_finite(params + buffers):
        bad = "BN statistics" if all_finite(params) else "parameters"
        raise NonFiniteLossError(f"{bad} became non-finite at step {step}; the loss was {loss.item():.4g}")
    scheduler.step()
    average_batchnorm_statistics(method)
    method.after_step(step, total_steps)
    return loss, logs


def split_batch(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """``parts`` micro-batches of equal size: every tensor of ``batch`` cut along its first axis
    (0-d tensors such as the batch's ``epoch`` go to every micro-batch as they are)."""
    for key, value in batch.items():
        if value.dim() and value.shape[0] % parts:
            raise UserError(
                f"--accumulate {parts} does not divide the {key!r} batch of {value.shape[0]} on this "
                "process; choose a batch size divisible by accumulate x processes"
            )
    pieces = {key: value.chunk(parts) if value.dim() else (value,) * parts for key, value in batch.items()}
    return [{key: chunks[i] for key, chunks in pieces.items()} for i in range(parts)]


def accumulate_gradients(
    step_fn: Callable[..., Any] | None,
    method: nn.Module,
    batch: dict[str, torch.Tensor],
    step: int,
    optimizer: torch.optim.Optimizer,
    amp: Callable[[], Any],
    scaler: torch.amp.GradScaler | None,
    parts: int,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Forward and backward ``parts`` micro-batches of ``batch``; their gradients add up to the
    gradient of the whole batch's mean loss. Returns the mean loss and the mean of the logs.

    Under DDP the gradient all-reduce runs once, with the last micro-batch (``no_sync`` before).
    The methods keep their once-a-step work for the real step: MoCo moves its teacher with the
    first micro-batch only and enqueues every micro-batch's keys in ``after_step``.
    """
    model = method if step_fn is None else step_fn
    ddp = getattr(model, "_orig_mod", model)  # torch.compile wraps the DDP module
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=next(method.parameters()).device)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    micro_batches = split_batch(batch, parts)
    for index, micro in enumerate(micro_batches):
        last = index == parts - 1
        sync = contextlib.nullcontext() if last or not isinstance(ddp, DDP) else ddp.no_sync()
        with sync:
            with amp():
                loss, logs = model(micro, step)
            if not torch.isfinite(loss.detach()).all():
                raise NonFiniteLossError(f"loss is {loss.item()} at step {step} (micro-batch {index + 1})")
            share = loss / parts
            (scaler.scale(share) if scaler is not None else share).backward()
        total += share.detach().float()
        for key, value in logs.items():  # some logs are undefined on some micro-batches
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1
    return total, {key: value / counts[key] for key, value in sums.items()}


# -- the run directory ----------------------------------------------------------------------------
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


def run_environment(run: Run) -> dict[str, Any]:
    """What the figures of a run depend on besides its config: the CPU thread count changes
    floating-point results, so it is recorded with the torch version and the device."""
    return {
        "torch": str(torch.__version__),  # a plain str: TorchVersion does not unpickle safely
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
    # a write killed mid-way leaves its temporary behind (the checkpoint itself is intact)
    for stale in (run_dir / "checkpoints").glob(f".{ckpt.CHECKPOINT_NAME}.*.tmp"):
        stale.unlink(missing_ok=True)
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write to run directory {run_dir}: {err.strerror}") from None


class RunLogger:
    """metrics.jsonl (one record per line, always) and the trackers ``loggers`` lists
    (TensorBoard by default; MLflow, W&B: ``emanorm.train.tracking``), on the main process."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        resume_step: int,
        *,
        loggers: str = "jsonl,tensorboard",
        config: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.trackers: list[tracking.Tracker] = []
        if not enabled:
            return
        if resume_step > 0 and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [line for line in kept if json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        self.trackers = tracking.open_trackers(loggers, run_dir, config or {}, resume_step)

    def record(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            if self.trackers:
                kind = record.get("kind", "train")
                scalars = {
                    f"{kind}/{key}": value
                    for key, value in record.items()
                    if key not in ("step", "epoch", "kind")
                    and isinstance(value, (int, float)) and not isinstance(value, bool)
                }
                for tracker in self.trackers:
                    tracker.log(scalars, record["step"])
        except OSError as err:
            raise UserError(f"could not write the run's metrics ({self.path.parent}): {_why(err)}") from None

    def close(self, status: str = "finished") -> None:
        """End the trackers' runs (``finished``, ``stopped`` or ``failed``), with the run's files."""
        artifacts = [self.run_dir / name for name in ("summary.json", "metrics.jsonl", "config.yaml")]
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            try:
                tracker.finish(artifacts, status)
            except OSError as err:
                where = self.run_dir
                raise UserError(f"could not write the run's tracker files in {where}: {_why(err)}") from None


# -- checkpoints ----------------------------------------------------------------------------------------
def _why(err: BaseException) -> str:
    """An OSError / torch write error in a few words ("no space left on device", ...)."""
    text = str(err).strip()
    if getattr(err, "errno", None) == errno.ENOSPC or "No space left" in text or "file write failed" in text:
        return "no space left on device"
    return getattr(err, "strerror", None) or (text.splitlines()[0] if text else type(err).__name__)


def write_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Atomic write; a full disk or a vanished directory is a clear error and the old file stays."""
    try:
        ckpt.atomic_save(state, path)
    except (OSError, RuntimeError) as err:  # torch reports a failed write as RuntimeError
        raise UserError(
            f"could not write checkpoint {path}: {_why(err)}; the previous checkpoint is intact"
        ) from None


def write_text(path: Path, text: str) -> None:
    """Write a small run file; a full disk or a read-only directory is one line naming the file."""
    try:
        path.write_text(text)
    except OSError as err:
        raise UserError(f"could not write {path}: {_why(err)}") from None


def save_checkpoint(run: Run, path: Path, position: dict[str, int], elapsed: float) -> None:
    """Every rank's RNG state gathered; rank 0 writes the weights, optimizer, schedule and position."""
    rngs = [ckpt.rng_state()]
    if run.dist.distributed:
        gathered: list[Any] = [None] * run.dist.world_size
        dist.all_gather_object(gathered, rngs[0])
        rngs = gathered
    if not run.dist.is_main:
        return
    method_state = run.method.state_dict()
    bad = [k for k, v in method_state.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:  # never replace the last good checkpoint with one that cannot be evaluated
        raise NonFiniteLossError(
            f"{len(bad)} tensors are non-finite (e.g. {', '.join(bad[:3])}); not checkpointed"
        )
    state = {
        "format": 1,
        "config": run.cfg,
        "dataset_info": asdict(run.info),
        "method": method_state,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        **position,  # epoch, step_in_epoch, global_step
        "elapsed": elapsed,
        "rng": rngs,
        "labeled_indices": run.labeled.cpu(),
    }
    write_checkpoint(state, path)


def restore_checkpoint(run: Run, path: Path, force: bool = False) -> tuple[dict[str, int], float]:
    """Load a checkpoint into the run; returns its position and elapsed seconds.

    A config that differs from the checkpoint's own (what matters for ``--resume``) is refused
    unless ``force``: the run would otherwise go on under one schedule and report another.
    """
    state = ckpt.safe_load(path, map_location=run.device)
    if not isinstance(state.get("config"), dict) or not all(
        isinstance(state.get(k), int) and state[k] >= 0 for k in ("epoch", "step_in_epoch", "global_step")
    ):
        raise UserError(f"{path} is not an emanorm training checkpoint (no config or position)")
    old, new = comparable(state["config"]), comparable(run.cfg)
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if differ and not force:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:5])
        raise UserError(f"--resume with a config that differs from the checkpoint's ({details}); "
                        "use --force to override")
    ckpt.load_matching(run.method, state["method"], f"checkpoint {path}")
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    rngs = state["rng"]
    ckpt.set_rng_state(rngs[run.dist.rank] if run.dist.rank < len(rngs) else rngs[0])
    if not torch.equal(state["labeled_indices"].cpu(), run.labeled.cpu()):
        raise UserError(
            f"the labeled split differs from the checkpoint's {path}: the dataset files, the seed or "
            "the label flags changed since it was written"
        )
    position = {k: state[k] for k in ("epoch", "step_in_epoch", "global_step")}
    log.info("resumed from %s at step %d (epoch %d)", path, position["global_step"], position["epoch"])
    return position, state.get("elapsed", 0.0)


def stopped_message(received: str | None, step: int, checkpoint_file: Path) -> str:
    return (
        f"stopped by {received} after step {step}; checkpoint kept at {checkpoint_file}; "
        f"continue with --resume (exit status {RESUMABLE_EXIT}: resumable)"
    )


# -- the loop -----------------------------------------------------------------------------------------
def train(
    cfg: dict[str, Any],
    *,
    monitor: Monitor | None = None,
    resume: bool | str = False,
    force: bool = False,
    progress: bool = True,
    return_method: bool = False,
) -> Any:
    """Run (or continue) the training a resolved config describes.

    ``monitor(method, run)`` evaluates along training (every ``eval_every`` epochs and at the end;
    ``emanorm train`` passes ``emanorm.evaluation.knn_monitor``); without one nothing is
    evaluated and the summary's ``final`` is empty. One trainer per run directory: a second one
    is refused (``RunBusyError``) before it changes anything. Returns the summary, or
    ``(summary, method)`` with ``return_method``. ``resume``: ``True`` or ``"auto"`` continue
    from the run directory's checkpoint when there is one and start fresh otherwise.

    SIGTERM or SIGUSR1 stops the run after the current step with a checkpoint on every rank and
    raises :class:`~emanorm.train.preemption.Preempted` (``emanorm train`` exits with 75).
    ``resume`` on a finished run (summary.json present) changes nothing and returns its summary
    (refused if its checkpoint is missing); with ``force`` as well, its final evaluation runs again.
    """
    dist_info = init_distributed(cfg["device"])
    if cfg["out"] is None:
        cfg["out"] = default_run_dir(cfg)
    peer_lost = False
    try:
        # the handlers stay on while a lost peer is diagnosed: torchrun's agent SIGTERMs survivors
        with contextlib.ExitStack() as held, StopSignals(dist_info.device, dist_info.distributed) as stop:
            def lock_and_check() -> None:
                held.enter_context(run_directory(Path(cfg["out"])))
                check_run_dir(cfg, resume, force)

            on_main_first(dist_info, lock_and_check)
            try:
                summary, method = _train(cfg, dist_info, monitor, resume, force, progress, stop)
            except RunFinished as finished:
                summary = finished.summary
                method = load_method(Path(cfg["out"]))[0] if return_method else None
            except RuntimeError as err:
                lost = peer_failure_message(err, dist_info) if dist_info.distributed else None
                if lost is None:
                    raise
                peer_lost = True
                kept = Path(cfg["out"]) / "checkpoints" / ckpt.CHECKPOINT_NAME
                message = f"{lost}; the last checkpoint is kept at {kept}; rerun with --resume"
                raise UserError(message) from None
        return (summary, method) if return_method else summary
    finally:
        if not peer_lost:  # a process group with a dead member may hang on the way down
            cleanup()


def on_main_first(dist_info: DistInfo, step: Callable[[], None]) -> None:
    """Run ``step`` on rank 0; its UserError stops every rank (none waits at a barrier for it)."""
    error: str | None = None
    failure: UserError | None = None
    if dist_info.is_main:
        try:
            step()
        except UserError as err:
            error, failure = str(err), err
    if dist_info.distributed:
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if failure is not None:
        raise failure
    if error is not None:
        raise UserError(error)


def _train(
    cfg: dict[str, Any],
    dist_info: DistInfo,
    monitor: Monitor | None,
    resume: bool | str,
    force: bool,
    progress: bool,
    stop: StopSignals,
) -> tuple[dict[str, Any], nn.Module]:
    run_dir = Path(cfg["out"])
    checkpoint_file = run_dir / "checkpoints" / ckpt.CHECKPOINT_NAME
    if resume and not force:
        summary = finished_run_summary(run_dir)
        if summary is not None:
            log.info("%s is already finished (summary.json); nothing changed "
                     "(--resume --force evaluates it again)", run_dir)
            raise RunFinished(summary)
    resuming = resume and checkpoint_file.exists()
    run = build_run(cfg, dist_info, resuming=resuming)  # everything validated before a file changes
    environment = run_environment(run)
    method = run.method
    if dist_info.is_main:
        claim_run_dir(run_dir, resume, force)
    barrier()

    position, elapsed = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}, 0.0
    if resuming:
        position, elapsed = restore_checkpoint(run, checkpoint_file, force)
    elif resume:
        log.debug("--resume: no checkpoint in %s yet, starting from scratch", run_dir)
    epoch, step_in_epoch, global_step = position["epoch"], position["step_in_epoch"], position["global_step"]
    if dist_info.is_main:
        write_text(run_dir / "config.yaml", dump_config(cfg))
        try:
            write_split_csv(run.labeled, run_dir / "labeled_split.csv")
        except OSError as err:
            raise UserError(f"could not write {run_dir / 'labeled_split.csv'}: {_why(err)}") from None
    logger = RunLogger(
        run_dir, dist_info.is_main, global_step, loggers=cfg.get("logger", "jsonl,tensorboard"), config=cfg
    )
    watch = CollapseWatch(cfg["method"], method.options)
    if global_step and logger.enabled and logger.path.exists():  # a resumed run keeps its window
        for old in read_metrics(logger.path):
            if old.get("kind", "train") == "train":
                watch.observe(old)
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

    def kept() -> str:
        if checkpoint_file.exists():
            return f"the last good checkpoint is kept at {checkpoint_file}"
        return "no checkpoint had been written yet"

    started = time.perf_counter()
    window_start, window_images = time.perf_counter(), 0
    last_eval: dict[str, float] = {}
    evaluated_at_end = False
    method.train()
    while global_step < run.total_steps:
        run.stream.set_epoch(epoch, step_in_epoch)
        for batch in run.stream:
            try:
                loss, logs = train_step(
                    run.step_fn, method, batch, global_step, run.total_steps, run.optimizer, run.scheduler,
                    amp=run.amp, scaler=run.scaler, accumulate=cfg.get("accumulate", 1),
                )
            except NonFiniteLossError as err:
                raise NonFiniteLossError(f"{err}; stopped, {kept()}") from None
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
                alarm = watch.observe(record)
                if alarm is not None:  # said once, in one line, and kept in metrics.jsonl
                    logger.record({"kind": "alarm", **alarm.as_dict()})
                    if dist_info.is_main:
                        bar.write(f"warning: {alarm.message}")
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
            if stop.requested():
                checkpoint()
                bar.close()
                logger.close("stopped")
                raise Preempted(stopped_message(stop.received, global_step, checkpoint_file))
            if global_step >= run.total_steps:
                break
        epoch_done = step_in_epoch >= run.steps_per_epoch
        if epoch_done:
            epoch, step_in_epoch = epoch + 1, 0
        finished = global_step >= run.total_steps
        try:  # the epoch is kept before its evaluation: a crash there loses no training
            checkpoint()
        except NonFiniteLossError as err:
            raise NonFiniteLossError(f"{err}; stopped, {kept()}") from None
        if finished or (cfg["eval_every"] and epoch_done and epoch % cfg["eval_every"] == 0):
            last_eval, evaluated_at_end = evaluate(final=finished), finished
    bar.close()
    if not evaluated_at_end:  # resumed after the last step's checkpoint: its evaluation is still due
        last_eval = evaluate(final=True)  # (on every rank: evaluate() ends with a barrier)

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
        "calibrate_bn_batches": cfg.get("calibrate_bn_batches", 0),
        "wall_clock_s": round(elapsed + time.perf_counter() - started, 1),
        "run_dir": str(run_dir),
        "final": last_eval,
        "collapse": watch.alarm.as_dict() if watch.alarm else None,
        "environment": environment,
    }
    if run.warnings:
        summary["warnings"] = run.warnings
    if dist_info.is_main:
        write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        write_run_curves(run_dir)
    logger.close()  # after summary.json: the trackers keep it as an artifact
    barrier()
    return summary, method
