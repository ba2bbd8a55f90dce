"""One trainer per run directory: an OS lock (``flock``) held for the run's whole life, and the
refusals of a directory a command must not write to (torch-free: ``emanorm train`` answers them
before it imports torch).

The kernel releases the lock when its holder dies, however it dies, so a lock left by a killed
trainer is simply taken over by the next one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from emanorm.errors import UserError
from emanorm.train.config import config_changes

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
#: ``checkpoint.CHECKPOINT_NAME`` (named here too: this module imports no torch).
CHECKPOINT_FILE = Path("checkpoints") / "last.pt"


class RunBusyError(UserError):
    """Another process is training this run (it holds the run's lock)."""


def _holder(lock_file: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(lock_file.read_text().strip() or "0")
        if pid:
            return f"pid {pid}; "
    return ""


def open_lock_file(lock_file: Path) -> int:
    """The lock file's descriptor; a directory that cannot hold it (read-only, full, gone) is one line."""
    try:
        return os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserError(
            f"cannot write to {lock_file.parent}: {err.strerror or err} (its lock file {lock_file.name} "
            "cannot be created); make the directory writable or choose another"
        ) from None


def check_writable_dir(directory: Path, what: str) -> None:
    """Refuse ``directory`` (or, while it does not exist, the folder it would be made in) when no file
    can be created there; nothing is left behind (an anonymous temporary file)."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what} {directory}: {existing} exists and is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UserError(f"{what} {directory} is not writable: {existing}: {err.strerror or err}") from None


@contextlib.contextmanager
def run_lock(lock_file: Path, *, what: str = "it", remove: bool = False) -> Iterator[int | None]:
    """Hold an exclusive ``flock`` on ``lock_file``; yields its descriptor (None without fcntl).

    A subprocess that inherits the descriptor keeps the lock for as long as it lives.
    ``RunBusyError`` when another process holds it. ``remove``: delete the file on release (the
    run directory is left as the user had it).
    """
    if fcntl is None:
        yield None
        return
    fd = open_lock_file(lock_file)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # the holder removes the file on release: a lock on a removed file is no lock
            if os.fstat(fd).st_ino != os.stat(lock_file).st_ino:
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            raise RunBusyError(
                f"another process is training {what} ({_holder(lock_file)}it holds {lock_file})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield fd
        finally:
            if remove:  # while still held, so no one can lock the old file after it is gone
                lock_file.unlink(missing_ok=True)
    finally:
        os.close(fd)


@contextlib.contextmanager
def run_directory(run_dir: Path) -> Iterator[Path]:
    """Create ``run_dir`` if needed and hold its lock; a directory made here is removed again when
    the run fails before its first checkpoint (there is nothing in it to resume)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} exists and is not a directory")
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create run directory {run_dir}: {err.strerror or err}") from None
    lock_file = run_dir / LOCK_NAME
    try:
        with run_lock(lock_file, what=f"the run in {run_dir}", remove=True):
            yield run_dir
    except BaseException:
        # nothing to resume in it (no checkpoint yet): a directory this command made goes again
        if created and not (run_dir / CHECKPOINT_FILE).exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def default_run_dir(cfg: dict[str, Any]) -> str:
    """``runs/<method>-<norm>-<dataset>-s<seed>``; a run started with ``--init-from`` adds
    ``-from-<source run>`` so that it never lands in the from-scratch run's directory."""
    name = f"runs/{cfg['method']}-{cfg['norm']}-{cfg['dataset']}-s{cfg['seed']}"
    if cfg.get("init_from"):
        source = Path(str(cfg["init_from"]).rstrip("/"))
        if source.suffix == ".pt":  # RUN_DIR/checkpoints/last.pt -> RUN_DIR's name
            source = source.parent.parent if source.parent.name == "checkpoints" else source.with_suffix("")
        name += f"-from-{source.name or 'checkpoint'}"
    return name


def check_run_dir(cfg: dict[str, Any], resume: bool, force: bool) -> Path:
    """Refuse a run directory that this command must not write to; changes nothing on disk."""
    run_dir = Path(cfg["out"])
    config_file = run_dir / "config.yaml"
    finished = (run_dir / "summary.json").exists()
    started = (run_dir / CHECKPOINT_FILE).exists() or config_file.exists()
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} exists and is not a directory")
    if resume and config_file.exists() and not force:
        try:
            previous = yaml.safe_load(config_file.read_text()) or {}
        except yaml.YAMLError:
            raise UserError(f"{config_file} is not valid YAML; use --force to start over") from None
        details = config_changes(previous, cfg)
        if details:
            raise UserError(f"--resume with a different config ({details}); use --force to override")
    elif not resume and finished and not force:  # --resume would change nothing: not a way out
        raise UserError(f"{run_dir} already holds a finished run; choose another --out for a new run, "
                        "or --force to train this one again from scratch")
    elif not resume and started and not force:
        raise UserError(f"{run_dir} already holds an unfinished run; use --resume to continue or --force "
                        "to overwrite")
    return run_dir


def check_run_dir_early(cfg: dict[str, Any], resume: bool, force: bool) -> None:
    """:func:`check_run_dir` and a busy lock, before anything is loaded (the trainer checks both
    again under its lock). Creates nothing: a directory that does not exist has nothing to refuse."""
    run_dir = Path(cfg["out"] or default_run_dir(cfg))
    if not run_dir.is_dir():
        check_run_dir({**cfg, "out": str(run_dir)}, resume, force)
        return
    with run_lock(run_dir / LOCK_NAME, what=f"the run in {run_dir}", remove=True):
        check_run_dir({**cfg, "out": str(run_dir)}, resume, force)
