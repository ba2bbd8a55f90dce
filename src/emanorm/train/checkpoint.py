"""Checkpoint files: atomic writes, safe loads (never unpickle code), RNG state, strict loading.

Rebuilding a run's method or backbone from a checkpoint is the recipe's job
(``emanorm.train.recipe.load_backbone``).
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from emanorm.errors import UserError

CHECKPOINT_NAME = "last.pt"


def atomic_save(obj: Any, path: str | Path) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename: the old file survives a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A run directory or a checkpoint file -> the checkpoint file."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "checkpoints" / CHECKPOINT_NAME
        if not candidate.is_file():
            raise UserError(f"no checkpoint in run directory {path} (expected {candidate})")
        return candidate
    if not path.is_file():
        raise UserError(f"checkpoint or run directory not found: {path}")
    return path


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\t\n\r" for ch in text)


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
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else "unsupported content"
        raise UserError(
            f"refusing to load {path}: it holds more than tensors and plain values ({first_line}); "
            "only load checkpoints you trust with other tools"
        ) from None
    except Exception as err:  # any other failure to parse: truncated, garbage, or an unknown format
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"checkpoint {path} is truncated or corrupt: {detail}") from None
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
