"""Checkpoint files: atomic writes, safe loads (never unpickle code), RNG state, strict loading,
and a training run's checkpoint: what it holds (:func:`save_checkpoint`) and how ``--resume``
puts it back (:func:`restore_checkpoint`).

Rebuilding a run's method or backbone from a checkpoint is the recipe's job
(``emanorm.train.restore.load_backbone``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pickle
import random
import re
import signal
import stat
import struct
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from emanorm.errors import NonFiniteLossError, UserError, first_line
from emanorm.train.config import config_changes, keep_recorded_start

if TYPE_CHECKING:  # the recipe imports this module
    from emanorm.train.recipe import Run

try:  # zipfile reads LZMA members only where Python was built with lzma
    import lzma
except ImportError:  # pragma: no cover
    lzma = None  # type: ignore[assignment]

log = logging.getLogger("emanorm")

CHECKPOINT_NAME = "last.pt"


def _atomic_replace(path: Path, mode: str, write: Callable[[IO[Any]], object]) -> None:
    """Write through ``write`` to a temporary file beside ``path``, fsync, then rename: a crash or a
    full disk leaves the old file as it was and no temporary behind."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def ctrl_c_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) back until the block ends, then raise it as ``KeyboardInterrupt``.

    A KeyboardInterrupt raised inside ``torch.save``'s writer reaches us as a RuntimeError ("unexpected
    pos ..."), which reads as a full disk and loses the interrupt; a write takes a moment, so finish it.
    Only on the main thread and while Python's own SIGINT handler is installed (else: unchanged).
    """
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def atomic_save(obj: Any, path: str | Path) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename: the old file survives a crash,
    and a Ctrl-C during the write lands once the new file is in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with ctrl_c_deferred():
        _atomic_replace(path, "wb", lambda handle: torch.save(obj, handle))
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename: a full disk leaves no empty or
    partial file (and an existing one as it was); the temporary is removed on failure."""
    _atomic_replace(Path(path), "w", lambda handle: handle.write(text))


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A run directory or a checkpoint file -> the checkpoint file."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "checkpoints" / CHECKPOINT_NAME
        if path.suffix in (".pt", ".pth", ".ckpt", ".tar") and not candidate.exists():
            raise UserError(f"{path} is a directory, not a checkpoint file (nor a run directory)")
        if candidate.exists() and not candidate.is_file():
            raise UserError(f"{candidate} is {file_kind(candidate)}, not a checkpoint file")
        if not candidate.is_file():
            raise UserError(f"no checkpoint in run directory {path} (expected {candidate})")
        return candidate
    if path.exists() and not path.is_file():
        raise UserError(f"{path} is {file_kind(path)}, not a checkpoint file or run directory")
    if not path.is_file():
        raise UserError(f"checkpoint or run directory not found: {path}")
    return path


def file_kind(path: Path) -> str:
    """What a path that is not a regular file is, in words ("a directory", "a FIFO", ...)."""
    mode = path.stat().st_mode
    for test, words in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return words
    return "not a regular file"


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\t\n\r" for ch in text)


# What CPython's zipfile raises, besides BadZipFile, OSError, UnicodeDecodeError (a name flagged
# UTF-8 that is not) and EOFError (a member shorter than its recorded size), while it reads a damaged
# archive's directory and members: a damaged compression method, version or flag
# (NotImplementedError; RuntimeError for "encrypted" or a decompressor this Python lacks), other
# ValueErrors, an offset past what a seek takes (OverflowError), a record too short to unpack
# (struct.error), and the decompressors' own errors once the method field names one (zlib, lzma).
_DAMAGED_ZIP_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.LargeZipFile, NotImplementedError, RuntimeError, ValueError, OverflowError,
    struct.error, zlib.error, *((lzma.LZMAError,) if lzma is not None else ()),
)


def verify_checkpoint_integrity(path: Path) -> None:
    """Refuse a damaged checkpoint: every member of torch's zip archive is read once, in 1 MiB
    chunks, and checked against the CRC-32 ``torch.save`` stored with it (``torch.load`` checks
    none, so flipped bytes would otherwise load as weights). About 1 s per GB.

    Every checkpoint of the zip format carries these CRCs, those written before this check
    included; members stored with a CRC of 0 (``torch.serialization.set_crc32_options(False)``)
    cannot be checked and are skipped. Old pickle-format files hold no checksum.
    """
    damaged = "is damaged (not the file that was written): "
    zip_error: BaseException | None = None
    try:
        with zipfile.ZipFile(path) as archive:
            size = path.stat().st_size
            for member in archive.infolist():
                if not 0 <= member.header_offset < size:  # else a seek fails as EINVAL, read as the disk's
                    raise zipfile.BadZipFile(f"member {member.filename!r} starts outside the file")
                if member.CRC == 0 and member.file_size > 0:
                    continue  # written without checksums
                with archive.open(member) as handle:
                    while handle.read(1 << 20):
                        pass
    except zipfile.BadZipFile as err:
        raise UserError(f"checkpoint {path} {damaged}{first_line(err, 200)}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"checkpoint {path} {damaged}a member name in its zip records is not UTF-8 "
                        f"({err.reason} at byte {err.start})") from None
    except EOFError:
        raise UserError(f"checkpoint {path} {damaged}a member ends before its recorded size") from None
    except _DAMAGED_ZIP_ERRORS as err:
        zip_error = err
    except OSError as err:
        if err.errno is not None:  # the disk's; errno-less is a decompressor's (bz2: "Invalid data stream")
            raise UserError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
        zip_error = err
    if zip_error is not None:
        detail = f"{_error_name(zip_error)}: {first_line(zip_error, 200)}"
        raise UserError(f"checkpoint {path} {damaged}{detail}") from None


def _error_name(err: BaseException) -> str:
    """``NotImplementedError``, ``zlib.error``: a module's class is named with its module."""
    kind = type(err)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def refused_global(err: Exception) -> str:
    """What torch's weights-only unpickler refused, in a few words: ``the global posix.system``
    (its message is paragraphs of advice with terminal colour codes)."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(err))
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"the global {found.group(1)}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "unsupported content"


def safe_load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(weights_only=True)``: a file that carries pickled code fails without running it."""
    path = resolve_checkpoint_path(path)
    try:
        with path.open("rb") as handle:
            head = handle.read(16)
    except OSError as err:
        raise UserError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    # torch.save writes a zip archive (older torch: a pickle, protocol byte 0x80); anything else is not ours
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        what = "empty" if not head else ("text" if _looks_like_text(head) else "neither a zip nor a pickle")
        raise UserError(f"{path} is not a PyTorch checkpoint (the file is {what})")
    if head.startswith(b"PK\x03\x04"):
        verify_checkpoint_integrity(path)
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"refusing to load {path}: it holds more than tensors and plain values ({refused_global(err)}); "
            "nothing of it was run; only load checkpoints you trust with other tools"
        ) from None
    except Exception as err:  # any other failure to parse: truncated, garbage, or an unknown format
        raise UserError(f"checkpoint {path} is truncated or corrupt: {first_line(err)}") from None
    if not isinstance(data, dict):
        raise UserError(f"checkpoint {path} does not hold a dict, got {type(data).__name__}")
    return data


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from, in tensors and plain values (safe to load)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def state_mismatch(module: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """What keeps ``state`` from loading into ``module`` with ``strict=True``, in one line (None: nothing)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if hasattr(state[k], "shape") and state[k].shape != own[k].shape
    ]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:5])})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:5])})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:3])})")
    return "; ".join(parts) or None


def load_matching(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error listing what differs."""
    mismatch = state_mismatch(module, state)
    if mismatch:
        raise UserError(f"{what} does not match this model: {mismatch}")
    module.load_state_dict(state, strict=True)


# -- a training run's checkpoint --------------------------------------------------------------------
def os_error_reason(err: BaseException) -> str:
    """An OSError / torch write error in a few words ("no space left on device", ...)."""
    text = str(err).strip()
    # torch's zip writer reports a short write as "file write failed" or "unexpected pos N vs M"
    short_write = ("No space left", "file write failed", "unexpected pos")
    if getattr(err, "errno", None) == errno.ENOSPC or any(words in text for words in short_write):
        return "no space left on device"
    return getattr(err, "strerror", None) or first_line(err)


def write_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Atomic write; a full disk or a vanished directory is a clear error and the old file stays."""
    had_one = path.exists()
    try:
        atomic_save(state, path)
    except (OSError, RuntimeError) as err:  # torch reports a failed write as RuntimeError
        kept = "the previous checkpoint is intact" if had_one else "no checkpoint had been written yet"
        raise UserError(f"could not write checkpoint {path}: {os_error_reason(err)}; {kept}") from None


def save_checkpoint(run: Run, path: Path, position: dict[str, int], elapsed: float) -> None:
    """Every rank's RNG state gathered; rank 0 writes the weights, optimizer, schedule and position."""
    rngs = [rng_state()]
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
    state = safe_load(path, map_location=run.device)
    if not isinstance(state.get("config"), dict) or not all(
        isinstance(state.get(k), int) and state[k] >= 0 for k in ("epoch", "step_in_epoch", "global_step")
    ):
        raise UserError(f"{path} is not an emanorm training checkpoint (no config or position)")
    for kept in keep_recorded_start(state["config"], run.cfg):  # before step 0 is past: as it started
        if run.dist.is_main:
            log.info("resuming: %s; it acts only before step 0", kept)
    details = config_changes(state["config"], run.cfg)
    if details and not force:
        raise UserError(f"--resume with a config that differs from the checkpoint's ({details}); "
                        "use --force to override")
    load_matching(run.method, state["method"], f"checkpoint {path}")
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    rngs = state["rng"]
    set_rng_state(rngs[run.dist.rank] if run.dist.rank < len(rngs) else rngs[0])
    if not torch.equal(state["labeled_indices"].cpu(), run.labeled.cpu()):
        raise UserError(
            f"the labeled split differs from the checkpoint's {path}: the dataset files, the seed or "
            "the label flags changed since it was written"
        )
    position = {k: state[k] for k in ("epoch", "step_in_epoch", "global_step")}
    log.info("resumed from %s at step %d (epoch %d)", path, position["global_step"], position["epoch"])
    return position, state.get("elapsed", 0.0)
