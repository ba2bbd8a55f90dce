"""The grid's runner: a pool of training subprocesses (or one in-process run), their supervision
(logs, exit codes, a parent that dies takes its children along, SIGTERM) and step progress.

A run is *finished* when its ``summary.json`` exists and is never trained again; any other run is
started with ``resume=True``, so a killed ``emanorm compare`` continues where it stopped.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from emanorm.errors import Interrupted, Preempted, UserError
from emanorm.evaluation.monitor import knn_monitor
from emanorm.experiments.planner import RunOutcome, RunSpec
from emanorm.train import train
from emanorm.train.config import dump_config
from emanorm.train.lock import RunBusyError, run_lock

log = logging.getLogger("emanorm")


def write_run_config(spec: RunSpec, folder: Path) -> Path:
    """The run's resolved config as YAML (``emanorm train --config FILE`` reproduces the run)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{spec.name}.yaml"
    path.write_text(dump_config(spec.config))
    return path


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _last_error_line(log_file: Path) -> str:
    """The most useful line of a failed run's log: its ``emanorm: error:`` line, else the last one."""
    try:
        lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    for line in reversed(lines):
        if line.startswith("emanorm: error:"):
            return line[len("emanorm: error:") :].strip()
    return lines[-1] if lines else "no output"


class _Children:
    """The training subprocesses alive now, so an interrupt can stop them all."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()
        self.stopping = False

    def terminate(self) -> None:
        with self.lock:
            self.stopping = True
            for proc in self.procs:
                if proc.poll() is None:
                    proc.terminate()


def _exit_error(code: int, log_file: Path) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit status {code}: {_last_error_line(log_file)}"


#: Set by ``compare`` for its training subprocesses: the pid they must not outlive.
PARENT_ENV = "EMANORM_PARENT_PID"


def die_with_parent() -> None:
    """In a training subprocess of ``compare``: ask the kernel for SIGTERM when the parent dies
    (Linux ``PR_SET_PDEATHSIG``), so a ``compare`` killed with SIGKILL leaves no trainer behind;
    exit at once if the parent is already gone. A no-op elsewhere."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if str(os.getppid()) != parent:
        raise SystemExit(f"emanorm: the compare process {parent} that started this run is gone")


def _run_subprocess(
    spec: RunSpec, config_file: Path, log_file: Path, threads: int, children: _Children
) -> tuple[str | None, float]:
    started = time.perf_counter()
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env[PARENT_ENV] = str(os.getpid())  # the child dies with this process (die_with_parent)
    command = [sys.executable, "-m", "emanorm", "train", "--config", str(config_file), "--resume", "auto"]
    command.append("--no-progress")
    try:
        with run_lock(log_file.with_suffix(".lock")) as lock_fd, log_file.open("w") as handle:
            handle.write("$ " + " ".join(command) + "\n")
            handle.flush()
            with children.lock:
                if children.stopping:
                    return "interrupted before it started", 0.0
                proc = subprocess.Popen(
                    command,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    env=env,
                    pass_fds=() if lock_fd is None else (lock_fd,),
                )
                children.procs.add(proc)
            try:
                code = proc.wait()
            finally:
                with children.lock:
                    children.procs.discard(proc)
    except RunBusyError as err:
        return str(err), 0.0
    seconds = time.perf_counter() - started
    return (_exit_error(code, log_file) if code != 0 else None), seconds


@contextlib.contextmanager
def _quiet_trainer() -> Iterator[None]:
    """The trainer's progress lines stay out of compare's own bar (warnings still show)."""
    logger = logging.getLogger("emanorm")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def steps_done(spec: RunSpec) -> int:
    """The last step a run's metrics.jsonl records (0 before its first record)."""
    path = spec.run_dir / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        with contextlib.suppress(json.JSONDecodeError, TypeError, ValueError):
            return int(json.loads(line)["step"])
    return 0


class StepProgress:
    """compare's bar in training steps over the whole grid (with an ETA) when every run has a
    ``max_steps`` budget; a thread reads the running runs' metrics.jsonl every ``interval`` s."""

    def __init__(self, bar: Any, specs: Sequence[RunSpec], interval: float = 2.0) -> None:
        self.bar, self.interval = bar, interval
        self.planned = {s.name: int(s.config["max_steps"]) for s in specs}
        self.finished: set[str] = set()
        self.specs = {s.name: s for s in specs}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    @staticmethod
    def applies(specs: Sequence[RunSpec]) -> bool:
        return bool(specs) and all(s.config.get("max_steps") for s in specs)

    def total(self) -> int:
        return sum(self.planned.values())

    def done(self) -> int:
        """Steps done over the grid; a run counts its last step only once it is finished, so the bar
        does not sit at 100% while the final evaluations run."""
        return sum(
            self.planned[name] if name in self.finished else min(steps_done(spec), self.planned[name] - 1)
            for name, spec in self.specs.items()
        )

    def evaluating(self) -> list[str]:
        """The runs past their last step that are not finished yet: in their final evaluation."""
        return [name for name, spec in self.specs.items()
                if name not in self.finished and steps_done(spec) >= self.planned[name]]

    def refresh(self) -> None:
        self.bar.n = self.done()
        base = self.bar.desc.split(" [final evaluation")[0].removesuffix(": ")
        evaluating = self.evaluating()
        self.bar.set_description_str(
            f"{base} [final evaluation: {', '.join(evaluating)}]" if evaluating else base, refresh=False
        )
        self.bar.refresh()

    def _poll(self) -> None:
        while not self.stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a progress display must never stop the grid
                self.refresh()

    def __enter__(self) -> StepProgress:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()


def _run_in_process(spec: RunSpec, log_file: Path) -> str | None:
    try:
        with run_lock(log_file.with_suffix(".lock")), _quiet_trainer():
            train(copy.deepcopy(spec.config), monitor=knn_monitor, resume=True, progress=False)
    except RunBusyError as err:
        return str(err)
    except UserError as err:
        log_file.write_text(f"emanorm: error: {err}\n")
        return str(err)
    except Interrupted:  # its "--resume" hint is for `emanorm train`: rerunning compare resumes the grid
        raise KeyboardInterrupt from None
    except GridStopped:  # the grid's own handler, before the trainer took the signal over
        raise
    except Preempted as stopped:  # the trainer caught the signal meant for the grid: stop the grid too
        raise grid_stopped(f"{str(stopped).split(';')[0]} of {spec.name}") from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # one broken run must not stop the grid; the log keeps the traceback
        log_file.write_text(traceback.format_exc())
        return f"{type(err).__name__}: {err}"
    return None


def run_grid(
    specs: Sequence[RunSpec],
    out: str | Path,
    *,
    jobs: int = 1,
    progress: bool = True,
    on_done: Callable[[RunOutcome], None] | None = None,
) -> list[RunOutcome]:
    """Train every unfinished run; finished ones are skipped. Failures are recorded, the rest go on.

    ``jobs == 1`` trains in this process (one run at a time, all CPU threads). ``jobs > 1`` starts
    that many ``python -m emanorm train --config OUT/configs/NAME.yaml --resume`` subprocesses at
    once, each with ``OMP_NUM_THREADS = cpus // jobs``; their output goes to ``OUT/logs/NAME.log``.
    """
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    out = Path(out)
    outcomes: dict[str, RunOutcome] = {}
    todo = []
    for spec in specs:
        if spec.state() == "finished":
            outcomes[spec.name] = RunOutcome(spec, "skipped")
        else:
            todo.append(spec)
    if todo:
        (out / "logs").mkdir(parents=True, exist_ok=True)
    threads = max(1, _cpu_count() // jobs)
    by_steps = StepProgress.applies(todo)
    bar = tqdm(
        total=sum(int(s.config["max_steps"]) for s in todo) if by_steps else len(todo),
        desc="compare", unit="step" if by_steps else "run", disable=not progress or not todo,
    )
    steps = StepProgress(bar, todo) if by_steps and not bar.disable else None
    failures = 0
    runs_done = 0

    def finish(spec: RunSpec, error: str | None, seconds: float) -> None:
        nonlocal failures, runs_done
        outcome = RunOutcome(spec, "failed" if error else "trained", error, seconds)
        outcomes[spec.name] = outcome
        failures += error is not None
        runs_done += 1
        shown = f"{runs_done}/{len(todo)} runs, last: {spec.name}"
        shown += f", {failures} failed" if failures else ""
        bar.set_postfix_str(shown, refresh=False)
        if steps is not None:
            steps.finished.add(spec.name)
            steps.refresh()
        else:
            bar.update(1)
        if error:
            log.warning("run %s failed: %s", spec.name, error)
        if on_done is not None:
            on_done(outcome)

    # SIGTERM (a scheduler, `kill`) stops the grid: children terminated, checkpoints kept, exit 75
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
        previous_handler = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if steps is not None:
            steps.__enter__()
        if jobs == 1:
            for spec in todo:
                write_run_config(spec, out / "configs")
                started = time.perf_counter()
                bar.set_description(f"compare: {spec.name}")
                error = _run_in_process(spec, out / "logs" / f"{spec.name}.log")
                finish(spec, error, time.perf_counter() - started)
        else:
            children = _Children()
            pool = ThreadPoolExecutor(max_workers=jobs)
            try:
                futures = {}
                for spec in todo:
                    config_file = write_run_config(spec, out / "configs")
                    log_file = out / "logs" / f"{spec.name}.log"
                    future = pool.submit(_run_subprocess, spec, config_file, log_file, threads, children)
                    futures[future] = spec
                for future in as_completed(futures):
                    finish(futures[future], *future.result())
            except BaseException:
                children.terminate()  # the checkpoints stay: the next invocation resumes them
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            pool.shutdown(wait=True)
    finally:
        if steps is not None:
            steps.__exit__(None, None, None)
        bar.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    return [outcomes[spec.name] for spec in specs]


class GridStopped(Preempted):
    """``compare`` stopped on a signal: every unfinished run keeps its checkpoint (exit 75)."""


def grid_stopped(what: str) -> GridStopped:
    """The one-line message: what stopped the grid, and that the same command resumes it."""
    return GridStopped(f"compare {what}; unfinished runs keep their checkpoints: rerun the same compare "
                     "command to resume (exit status 75: resumable)")


def _interrupt(signum: int, frame: Any) -> None:
    raise grid_stopped(f"stopped by {signal.Signals(signum).name}")
