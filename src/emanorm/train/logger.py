"""What a run shows and records as it trains: metrics.jsonl and the trackers (:class:`RunLogger`),
the progress bar or progress lines and the throughput of the train records (:class:`Progress`)."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from emanorm.errors import UserError
from emanorm.train import tracking
from emanorm.train.checkpoint import os_error_reason
from emanorm.train.progress import PlannedEvaluation, TrainingProgress
from emanorm.train.run_records import keep_metrics_until

log = logging.getLogger("emanorm")


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
        # the trackers first: one that cannot start leaves the run's metrics as they were
        self.trackers = tracking.open_trackers(loggers, run_dir, config or {}, resume_step)
        if resume_step > 0 and self.path.exists():
            keep_metrics_until(self.path, resume_step)
        elif self.path.exists():
            self.path.unlink()

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
            raise UserError(
                f"could not write the run's metrics ({self.path.parent}): {os_error_reason(err)}"
            ) from None

    def close(self, status: str = "finished") -> None:
        """End the trackers' runs (``finished``, ``stopped`` or ``failed``), with the run's files."""
        artifacts = [self.run_dir / name for name in ("summary.json", "metrics.jsonl", "config.yaml")]
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            try:
                tracker.finish(artifacts, status)
            except OSError as err:
                where = self.run_dir
                raise UserError(
                    f"could not write the run's tracker files in {where}: {os_error_reason(err)}"
                ) from None


def format_results(results: dict[str, Any]) -> str:
    """``knn_teacher 80.46, ..., knn_k 20, knn_bank 10000``: floats with 2 decimals, counts as integers."""
    return ", ".join(
        f"{k} {v}" if isinstance(v, int) or not isinstance(v, float) else f"{k} {v:.2f}"
        for k, v in results.items()
    )


class Progress:
    """The progress bar on the main process (``bar``: :class:`~emanorm.train.progress.TrainingProgress`,
    whose rate leaves the evaluations out and whose ETA adds the ``evaluations`` still planned), or
    without one a line at every tenth of the steps and one per evaluation; and the images per second
    of the train records (training time only: evaluations are left out)."""

    def __init__(
        self,
        name: str,
        total_steps: int,
        initial_step: int,
        *,
        bar: bool,
        is_main: bool,
        evaluations: Sequence[PlannedEvaluation] = (),
    ) -> None:
        self.name = name
        self.total_steps = total_steps
        self.bar = TrainingProgress(total_steps, initial_step, name, enabled=bar and is_main,
                                    evaluations=evaluations)
        self.report_every = 0 if bar or not is_main else max(1, total_steps // 10)
        self.window_start, self.window_images = self.bar.training_clock(), 0
        # (step, loss) of the last train record: the progress lines print it rather than read the
        # step's loss back from the device, which would wait for the device's queue (issue 29)
        self.last_logged: tuple[int, float] | None = None

    def count_images(self, batch: dict[str, torch.Tensor]) -> None:
        self.window_images += sum(v.shape[0] for v in batch.values() if v.dim() == 4)

    def images_per_second(self) -> float:
        """Images per second of training since the last train record (and start a new window)."""
        seconds = max(self.bar.training_clock() - self.window_start, 1e-9)
        rate = self.window_images / seconds
        self.window_start, self.window_images = self.bar.training_clock(), 0
        return rate

    def show_record(self, record: dict[str, Any]) -> None:
        self.last_logged = (record["step"], record["loss"])
        shown = {"loss": f"{record['loss']:.3f}", "img/s": f"{record['img_per_s']:.0f}"}
        if "mask" in record:
            shown["mask"] = f"{record['mask']:.2f}"
        self.bar.set_postfix(shown)

    def advance(self, step: int) -> None:
        """One step done: the bar moves, or a progress line at every tenth of the steps (with the
        loss of the last train record, at most ``log_every`` steps old)."""
        self.bar.advance(step)
        if self.report_every and (step % self.report_every == 0 or step == self.total_steps):
            if self.last_logged is None:
                log.info("step %d/%d", step, self.total_steps)
            elif self.last_logged[0] == step:
                log.info("step %d/%d, loss %.4f", step, self.total_steps, self.last_logged[1])
            else:
                log.info("step %d/%d, loss %.4f (logged at step %d)", step, self.total_steps,
                         self.last_logged[1], self.last_logged[0])

    @contextlib.contextmanager
    def evaluating(self, step: int, kind: str, *, final: bool, images: int | None = None) -> Iterator[None]:
        """Around an evaluation: a line without a bar; with one, the evaluation's own progress in
        its description, its time kept out of the training rate and measured for the ETA."""
        if not self.bar.enabled:
            log.info("step %d/%d: %s ...", step, self.total_steps, kind)
        with self.bar.evaluating(kind, final=final, images=images):
            yield

    def write(self, line: str) -> None:
        self.bar.write(line)

    def close(self) -> None:
        self.bar.close()
