"""What ``emanorm train`` shows while it runs: the step bar, its rate and an ETA with the evaluations.

The bar's rate is the *training* rate: time spent evaluating is kept out of it (and out of
``img_per_s`` in metrics.jsonl, through :meth:`TrainingProgress.training_clock`). The ETA is the
remaining steps at that rate plus the evaluations still planned, each estimated from the
evaluations measured so far in this process (seconds per image through the networks, scaled to
the next evaluation's size; an evaluation of an unmeasured kind shows as ``+eval``).

An evaluation reports its own progress through :func:`report_evaluation` (the kNN monitor calls
it after each batch); while one runs the bar's description says which and how far it is.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from tqdm.auto import tqdm

#: ``callback(phase, done, total)`` of the evaluation running now (``None``: nobody listens).
_listener: contextvars.ContextVar[Callable[[str, int, int], None] | None] = contextvars.ContextVar(
    "emanorm_evaluation_progress", default=None
)


def report_evaluation(phase: str, done: int, total: int) -> None:
    """An evaluation has put ``done`` of its ``total`` images through the networks (in ``phase``,
    e.g. ``teacher``); shown on the training bar when one listens, ignored otherwise."""
    listener = _listener.get()
    if listener is not None:
        listener(phase, done, total)


@contextlib.contextmanager
def listening(callback: Callable[[str, int, int], None]) -> Iterator[None]:
    """Route :func:`report_evaluation` calls to ``callback`` for the duration of the block."""
    token = _listener.set(callback)
    try:
        yield
    finally:
        _listener.reset(token)


@dataclass(frozen=True)
class PlannedEvaluation:
    """An evaluation the loop will run after ``step``: its kind and its size in images."""

    step: int
    final: bool
    images: int


def planned_evaluations(
    total_steps: int, steps_per_epoch: int, eval_every: int, light_images: int, final_images: int
) -> list[PlannedEvaluation]:
    """The evaluations of a run, as the loop schedules them: after every ``eval_every``-th whole
    epoch before the end (light ones), and the final one after the last step."""
    plan = []
    if eval_every and steps_per_epoch:
        epoch = eval_every
        while epoch * steps_per_epoch < total_steps:
            plan.append(PlannedEvaluation(epoch * steps_per_epoch, False, light_images))
            epoch += eval_every
    plan.append(PlannedEvaluation(total_steps, True, final_images))
    return plan


def evaluation_images(cfg: dict[str, Any], labeled_train_images: int, test_images: int) -> int:
    """The size of an evaluation of the kNN monitor under ``cfg``: its bank plus its test queries."""
    bank = min(cfg["knn_bank_size"], labeled_train_images)
    queries = test_images if cfg["monitor_test_size"] is None else min(cfg["monitor_test_size"], test_images)
    return bank + queries


def format_seconds(seconds: float) -> str:
    return tqdm.format_interval(max(0.0, seconds))


class _Bar(tqdm):  # type: ignore[misc]
    """tqdm with the rate and the ETA supplied by :class:`TrainingProgress`."""

    owner: TrainingProgress | None = None

    @property
    def format_dict(self) -> dict[str, Any]:
        shown = super().format_dict
        if self.owner is not None:
            shown["rate"] = self.owner.steps_per_second()
            shown["eta"] = self.owner.eta_text()
        else:
            shown["eta"] = "?"
        return shown


class TrainingProgress:
    """The training bar (disabled: a no-op that still keeps the training clock)."""

    _open: ClassVar[weakref.WeakSet[TrainingProgress]] = weakref.WeakSet()
    BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{eta}, {rate_fmt}{postfix}]"

    def __init__(
        self,
        total_steps: int,
        initial: int,
        name: str,
        *,
        enabled: bool,
        evaluations: Sequence[PlannedEvaluation] = (),
        window: int = 100,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.clock = clock
        self.name = name
        self.total_steps = total_steps
        self.step = initial
        self.evaluations = list(evaluations)
        self.paused_s = 0.0  # seconds spent evaluating: kept out of the training clock
        self.marks: deque[tuple[float, int]] = deque([(self.training_clock(), initial)], maxlen=window + 1)
        self.seconds_per_image: dict[bool, float] = {}  # by kind (final or light), measured here
        self.bar = _Bar(
            total=total_steps, initial=initial, desc=name, unit="step", disable=not enabled,
            bar_format=self.BAR_FORMAT,
        )
        self.bar.owner = self
        TrainingProgress._open.add(self)

    @property
    def enabled(self) -> bool:
        return not self.bar.disable

    def training_clock(self) -> float:
        """Seconds of wall-clock, less the time spent in evaluations (a monotonic clock)."""
        return self.clock() - self.paused_s

    # -- training -------------------------------------------------------------------------------
    def advance(self, step: int) -> None:
        self.step = step
        self.marks.append((self.training_clock(), step))
        self.bar.update(step - self.bar.n)

    def set_postfix(self, shown: dict[str, str]) -> None:
        self.bar.set_postfix(shown, refresh=False)

    def steps_per_second(self) -> float | None:
        (t0, s0), (t1, s1) = self.marks[0], self.marks[-1]
        return (s1 - s0) / (t1 - t0) if s1 > s0 and t1 > t0 else None

    def eta_seconds(self) -> float | None:
        """Training left at the current rate plus the planned evaluations not yet run; None until a
        step has been timed or while an evaluation kind has never been measured."""
        rate = self.steps_per_second()
        if rate is None:
            return None
        seconds = (self.total_steps - self.step) / rate
        for evaluation in self.evaluations:
            if evaluation.step < self.step:  # one this process did not run (resumed past it)
                continue
            estimate = self.estimate(evaluation)
            if estimate is None:
                return None
            seconds += estimate
        return seconds

    def estimate(self, evaluation: PlannedEvaluation) -> float | None:
        """Seconds the evaluation should take: its own kind's measured rate, else the other kind's."""
        measured = self.seconds_per_image
        per_image = measured.get(evaluation.final, measured.get(not evaluation.final))
        return None if per_image is None else per_image * evaluation.images

    def eta_text(self) -> str:
        seconds = self.eta_seconds()
        if seconds is not None:
            return format_seconds(seconds)
        rate = self.steps_per_second()
        if rate is None:
            return "?"
        return format_seconds((self.total_steps - self.step) / rate) + "+eval"

    # -- evaluations ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def evaluating(self, kind: str, *, final: bool, images: int | None = None) -> Iterator[None]:
        """Around an evaluation: its time is measured (for the ETA) and kept out of the training
        rate; its own progress (:func:`report_evaluation`) shows in the bar's description."""
        started = self.clock()

        def show(phase: str, done: int, total: int) -> None:
            if self.enabled and total > 0:
                self.bar.set_description_str(
                    f"{self.name} [{kind} {100 * done // total}%: {phase}]", refresh=True
                )

        if self.enabled:
            self.bar.set_description_str(f"{self.name} [{kind}]", refresh=True)
        try:
            with listening(show):
                yield
        finally:
            seconds = self.clock() - started
            self.paused_s += seconds  # the rate's window goes on across it, in training time
            if images:
                self.seconds_per_image[final] = seconds / images
            self.evaluations = [e for e in self.evaluations if not (e.step == self.step and e.final == final)]
            if self.enabled:
                self.bar.set_description_str(self.name, refresh=False)

    def write(self, line: str) -> None:
        self.bar.write(line)

    def close(self) -> None:
        self.bar.close()
        TrainingProgress._open.discard(self)

    @classmethod
    def close_all(cls) -> None:
        """End every open bar's line (before a message that must stand on its own line)."""
        for progress in list(cls._open):
            progress.close()
