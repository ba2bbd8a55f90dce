"""The one training loop every method runs on, read top to bottom: :func:`train` (the run
directory, its lock, the stop signals and the processes around one run) -> :func:`fit` (the epochs:
steps, checkpoints, evaluations) -> :func:`train_step` (one optimisation step).

Everything a run is made of comes from the recipe (``build_run``); the run directory's policy and
summary.json from ``rundir``, checkpoints from ``checkpoint``, metrics and progress from ``logger``,
what happens around each step from ``hooks``; evaluation along training is a callback (``monitor``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emanorm.errors import Interrupted, NonFiniteLossError, UserError
from emanorm.norms import average_batchnorm_statistics
from emanorm.train import rundir
from emanorm.train.accumulate import forward_backward, split_batch, unwrap
from emanorm.train.checkpoint import save_checkpoint, write_checkpoint
from emanorm.train.distributed import (
    barrier,
    cleanup,
    init_distributed,
    on_main_first,
    peer_failure_message,
)
from emanorm.train.finite import FiniteWatch
from emanorm.train.hooks import Hooks, Monitor, TrainState, collapse_watch, evaluation_plan, light_run
from emanorm.train.lock import default_run_dir
from emanorm.train.logger import Progress, RunLogger
from emanorm.train.preemption import StopSignals
from emanorm.train.progress import TrainingProgress
from emanorm.train.recipe import Run
from emanorm.train.restore import load_method
from emanorm.train.rundir import RunFinished, checkpoint_path, claim_run_dir, open_run

# names the trainer has always offered here (tests, docs and loops of your own import them)
__all__ = [
    "FiniteWatch", "Monitor", "NonFiniteLossError", "RunLogger", "claim_run_dir", "fit", "forward_backward",
    "light_run", "save_checkpoint", "split_batch", "train", "train_step", "write_checkpoint",
]

log = logging.getLogger("emanorm")


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
    raises :class:`~emanorm.errors.Preempted` (``emanorm train`` exits with 75). Ctrl-C raises
    :class:`~emanorm.errors.Interrupted` saying which checkpoint is kept (exit 130).
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
            on_main_first(dist_info, functools.partial(rundir.lock_and_check, held, cfg, resume, force))
            try:
                run, state = open_run(cfg, dist_info, resume, force)
                summary = train_run(run, state, monitor, progress, stop)
            except RunFinished as finished:
                summary = finished.summary
                run = None
            except KeyboardInterrupt as interrupt:
                if isinstance(interrupt, Interrupted):
                    raise
                TrainingProgress.close_all()  # the message goes on a line of its own
                raise Interrupted(rundir.interrupted_message(Path(cfg["out"]))) from None
            except RuntimeError as err:
                lost = peer_failure_message(err, dist_info) if dist_info.distributed else None
                if lost is None:
                    raise
                peer_lost = True
                kept = checkpoint_path(Path(cfg["out"]))
                message = f"{lost}; the last checkpoint is kept at {kept}; rerun with --resume"
                raise UserError(message) from None
            if not return_method:
                return summary
            return summary, run.method if run is not None else load_method(Path(cfg["out"]))[0]
    finally:
        if not peer_lost:  # a process group with a dead member may hang on the way down
            cleanup()


def train_run(
    run: Run, state: TrainState, monitor: Monitor | None, progress: bool, stop: StopSignals
) -> dict[str, Any]:
    """Fit the opened run to its last step and write its summary.json; returns the summary."""
    cfg, run_dir, is_main, step = run.cfg, Path(run.cfg["out"]), run.dist.is_main, state.global_step
    environment = rundir.run_environment(run)
    logger = RunLogger(run_dir, is_main, step, loggers=cfg.get("logger", "jsonl,tensorboard"), config=cfg)
    planned = evaluation_plan(run) if monitor is not None else ()  # the bar's ETA includes them
    bar = Progress(f"{cfg['method']}-{cfg['norm']}", run.total_steps, step, bar=progress, is_main=is_main,
                   evaluations=planned)
    watch = collapse_watch(run, logger, step)
    hooks = Hooks(run, checkpoint_path(run_dir), logger, bar, monitor, stop, watch)
    fit(run, state, hooks)
    alarm = watch.alarm.as_dict() if watch.alarm else None
    summary = rundir.run_summary(run, state.global_step, state.seconds(), state.last_eval, environment, alarm)
    if is_main:
        rundir.write_summary(run_dir, summary)
    logger.close()  # after summary.json: the trackers keep it as an artifact
    barrier()
    return summary


def fit(run: Run, state: TrainState, hooks: Hooks) -> None:
    """Train from ``state`` to ``run.total_steps``, epoch by epoch: each step, then a checkpoint at
    each epoch's end (or the last step) and an evaluation every ``eval_every`` epochs and at the end."""
    state.started = time.perf_counter()
    evaluated_at_end = False
    run.method.train()
    while state.global_step < run.total_steps:
        run.stream.set_epoch(state.epoch, state.step_in_epoch)
        for batch in run.stream:
            try:
                loss, logs = train_step(
                    run.step_fn, run.method, batch, state.global_step, run.total_steps, run.optimizer,
                    run.scheduler, amp=run.amp, scaler=run.scaler, accumulate=run.cfg.get("accumulate", 1),
                    finite_watch=hooks.finite_watch,
                )
            except NonFiniteLossError as err:
                raise hooks.non_finite(err) from None
            state.global_step += 1
            state.step_in_epoch += 1
            hooks.after_step(state, loss, logs, batch)
            if state.global_step >= run.total_steps:
                break
        epoch_done = state.step_in_epoch >= run.steps_per_epoch
        if epoch_done:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        finished = state.global_step >= run.total_steps
        hooks.end_of_epoch_checkpoint(state)
        if finished or (run.cfg["eval_every"] and epoch_done and state.epoch % run.cfg["eval_every"] == 0):
            state.last_eval, evaluated_at_end = hooks.evaluate(state, final=finished), finished
    hooks.progress.close()
    if not evaluated_at_end:  # resumed after the last step's checkpoint: its evaluation is still due
        state.last_eval = hooks.evaluate(state, final=True)  # (on every rank: it ends with a barrier)


# -- one step -------------------------------------------------------------------------------------------
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
    finite_watch: FiniteWatch | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimisation step exactly as ``emanorm train`` runs it, for loops of your own.

    ``step_fn`` runs ``method.training_step`` (the method itself, its DDP wrapper or a compiled
    version; ``None``: the method). Forward under ``amp`` and backward (scaled with ``scaler``)
    of each of ``accumulate`` micro-batches; then, once: ``scaler.unscale_``,
    ``method.before_optimizer_step()`` (on the all-reduced, accumulated, unscaled gradients:
    DINO's clipping and frozen layer), the optimizer step, the scheduler step, the BN-statistics
    all-reduce across ranks and ``method.after_step`` (the teacher update, MoCo's queue, DINO's
    centre). Returns the (mean) loss and the method's logs (mean over the micro-batches), all
    detached 0-d tensors: nothing is read back to the host (convert at your log steps:
    ``emanorm.methods.tensors.logs_to_floats``).

    Non-finite losses and weights: with ``finite_watch`` (a :class:`FiniteWatch`) the step only
    records them on the device and the caller calls ``finite_watch.check()`` at its log steps and
    before it saves anything (``emanorm train`` does); without one the step checks at once (two
    synchronisations) and raises :class:`NonFiniteLossError` before the optimizer step (loss) or
    before the teacher moves (weights). ``accumulate`` N > 1 splits ``batch`` into N equal
    micro-batches and sums their gradients (each loss divided by N) before the one optimizer step.
    """
    core = unwrap(method)
    immediate = finite_watch is None
    watch = FiniteWatch() if immediate else finite_watch
    loss, logs, losses = forward_backward(
        step_fn, method, batch, step, optimizer, amp, scaler, accumulate, check_now=immediate
    )
    if scaler is not None:
        scaler.unscale_(optimizer)  # the method sees true gradients (DINO clips them)
    before = getattr(core, "before_optimizer_step", None)
    if before is not None:
        before()
    if scaler is not None:
        scaler.step(optimizer)  # (fp16's GradScaler reads its inf flag here: one sync, its design)
        scaler.update()
    else:
        optimizer.step()
    # A finite loss can still step into non-finite weights or BN statistics (a huge lr): recorded
    # before the teacher copies them; no checkpoint is written before the watch is checked.
    params = [p.detach() for group in optimizer.param_groups for p in group["params"]]
    buffers = [b for b in method.buffers() if b.is_floating_point()]
    watch.observe(step, losses, params, buffers, micro_batches=accumulate > 1)
    if immediate:
        watch.check()
    scheduler.step()
    average_batchnorm_statistics(method)
    core.after_step(step, total_steps)
    return loss, logs
