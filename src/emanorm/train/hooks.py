"""Where a run is (:class:`TrainState`) and what the loop does around its steps (:class:`Hooks`):
records and progress, checkpoints, evaluations along training, stop signals.

``emanorm.train.loop.fit`` walks the steps and calls these at fixed points; each is one small,
named job, so the loop itself reads as the order of events.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emanorm.collapse import CollapseWatch
from emanorm.errors import NonFiniteLossError
from emanorm.methods.tensors import logs_to_floats
from emanorm.train.checkpoint import save_checkpoint
from emanorm.train.curves import read_metrics
from emanorm.train.distributed import barrier
from emanorm.train.finite import FiniteWatch
from emanorm.train.logger import Progress, RunLogger, format_results
from emanorm.train.preemption import Preempted, StopSignals, stopped_message
from emanorm.train.progress import PlannedEvaluation, evaluation_images, planned_evaluations
from emanorm.train.recipe import Run

#: ``monitor(method, run) -> {name: value}``: evaluation along training
#: (``emanorm.evaluation.knn_monitor`` for ``emanorm train``).
Monitor = Callable[[nn.Module, Run], dict[str, float]]


@dataclasses.dataclass
class TrainState:
    """The run's position (what a checkpoint records), its time and its latest evaluation."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    elapsed: float = 0.0  # seconds trained before this process (from the checkpoint)
    started: float = dataclasses.field(default_factory=time.perf_counter)  # this process's start
    last_eval: dict[str, float] = dataclasses.field(default_factory=dict)

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step}

    def seconds(self) -> float:
        """Training time so far, across resumptions."""
        return self.elapsed + time.perf_counter() - self.started


def light_run(run: Run) -> Run:
    """The run as the evaluations along training see it: with ``eval_light_size`` set, a kNN bank
    and test queries of at most that many images (the final evaluation uses the full sizes)."""
    size = run.cfg.get("eval_light_size")
    if not size:
        return run
    bank = min(run.cfg["knn_bank_size"], size)
    queries = size if run.cfg["monitor_test_size"] is None else min(run.cfg["monitor_test_size"], size)
    return dataclasses.replace(run, cfg={**run.cfg, "knn_bank_size": bank, "monitor_test_size": queries})


def evaluation_size(run: Run) -> int:
    """Images one kNN-monitor evaluation of ``run`` puts through each network (for the ETA)."""
    return evaluation_images(run.cfg, int((run.train_ds.targets >= 0).sum()), len(run.test_ds))


def evaluation_plan(run: Run) -> list[PlannedEvaluation]:
    """The evaluations the loop will run, with their sizes: the progress bar's ETA includes them."""
    return planned_evaluations(
        run.total_steps, run.steps_per_epoch, run.cfg["eval_every"],
        evaluation_size(light_run(run)), evaluation_size(run),
    )


def collapse_watch(run: Run, logger: RunLogger, resume_step: int) -> CollapseWatch:
    """The collapse alarm's watch over the train records; a resumed run keeps its window."""
    watch = CollapseWatch(run.cfg["method"], run.method.options)
    if resume_step and logger.enabled and logger.path.exists():
        for old in read_metrics(logger.path):
            if old.get("kind", "train") == "train":
                watch.observe(old)
    return watch


@dataclasses.dataclass
class Hooks:
    """What :func:`~emanorm.train.loop.fit` calls around the steps of ``run``."""

    run: Run
    checkpoint_file: Path
    logger: RunLogger
    progress: Progress
    monitor: Monitor | None
    stop: StopSignals
    watch: CollapseWatch
    # the steps record non-finite values on the device; read at log steps and before checkpoints
    finite_watch: FiniteWatch = dataclasses.field(default_factory=FiniteWatch)

    def after_step(self, state: TrainState, loss: torch.Tensor, logs: dict[str, Any],
                   batch: dict[str, torch.Tensor]) -> None:
        """The train record, progress, the periodic checkpoint, and a stop if a signal came."""
        self.progress.count_images(batch)
        step, cfg = state.global_step, self.run.cfg
        if step % cfg["log_every"] == 0 or step == self.run.total_steps:
            self.record_train(state, loss, logs)
        self.progress.advance(step)
        if cfg["checkpoint_every_steps"] and step % cfg["checkpoint_every_steps"] == 0:
            self.checkpoint(state)
        if self.stop.requested():
            self.checkpoint(state)
            self.progress.close()
            self.logger.close("stopped")
            raise Preempted(stopped_message(self.stop.received, step, self.checkpoint_file))

    def record_train(self, state: TrainState, loss: torch.Tensor, logs: dict[str, Any]) -> None:
        """One train record (metrics.jsonl, trackers, the bar), and the collapse alarm's check of it."""
        self.check_finite()  # the step's values are read back here anyway
        record: dict[str, Any] = {"kind": "train", "step": state.global_step, "epoch": state.epoch}
        record.update(logs_to_floats({"loss": loss, **logs}))  # one read-back for all of them
        record["lr"] = self.run.optimizer.param_groups[0]["lr"]
        record["img_per_s"] = self.progress.images_per_second()
        self.logger.record(record)
        alarm = self.watch.observe(record)
        if alarm is not None:  # said once, in one line, and kept in metrics.jsonl
            self.logger.record({"kind": "alarm", **alarm.as_dict()})
            if self.run.dist.is_main:
                self.progress.write(f"warning: {alarm.message}")
        self.progress.show_record(record)

    def check_finite(self) -> None:
        """Raise (with what the run keeps) if a step so far had a non-finite loss or weights."""
        try:
            self.finite_watch.check()
        except NonFiniteLossError as err:
            raise self.non_finite(err) from None

    def checkpoint(self, state: TrainState) -> None:
        """A checkpoint of ``state``; nothing non-finite is ever checkpointed."""
        self.check_finite()
        try:
            save_checkpoint(self.run, self.checkpoint_file, state.position(), state.seconds())
        except NonFiniteLossError as err:
            raise self.non_finite(err) from None

    def end_of_epoch_checkpoint(self, state: TrainState) -> None:
        """The epoch is kept before its evaluation: a crash there loses no training."""
        self.checkpoint(state)

    def non_finite(self, err: NonFiniteLossError) -> NonFiniteLossError:
        """``err`` with where the run stopped and what it keeps."""
        if self.checkpoint_file.exists():
            kept = f"the last good checkpoint is kept at {self.checkpoint_file}"
        else:
            kept = "no checkpoint had been written yet"
        return NonFiniteLossError(f"{err}; stopped, {kept}")

    def evaluate(self, state: TrainState, final: bool) -> dict[str, float]:
        """The monitor on the main process (light along training, full at the end); every rank
        meets at the barrier after it."""
        if self.monitor is None or not self.run.dist.is_main:
            barrier()
            return {}
        kind = "final evaluation" if final else "evaluation"
        evaluated = self.run if final else light_run(self.run)
        eval_started = time.perf_counter()
        images = evaluation_size(evaluated)
        with self.progress.evaluating(state.global_step, kind, final=final, images=images):
            results = self.monitor(self.run.method, evaluated)
        seconds = time.perf_counter() - eval_started
        if results:
            light = not final and light_run(self.run) is not self.run
            self.logger.record({"kind": "eval", "step": state.global_step, "epoch": state.epoch, **results,
                                "eval_s": round(seconds, 1), "light": light})
            shown = f"{format_results(results)} ({kind}, {seconds:.0f} s)"
            self.progress.write(f"step {state.global_step} epoch {state.epoch}: {shown}")
        barrier()
        return results
