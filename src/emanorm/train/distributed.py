"""torchrun / torch.distributed set-up, rank 0's checks that stop every rank, and the diagnosis of
a lost peer. (The one collective the trainer adds, the BN-statistics average, is
:func:`emanorm.norms.average_batchnorm_statistics`, shared with the calibrated start.)"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from emanorm.errors import UserError, first_line


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is visible (use --device cpu or auto)")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto") -> DistInfo:
    """Read torchrun's environment; one process without it. gloo on CPU, NCCL on GPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=collective_timeout())
    return DistInfo(rank, world_size, local_rank, device)


def collective_timeout() -> timedelta:
    """How long a collective waits for a peer (``EMANORM_DIST_TIMEOUT`` seconds, default 300): a
    dead peer must stop the job in bounded time rather than hang forever."""
    return timedelta(seconds=float(os.environ.get("EMANORM_DIST_TIMEOUT", "300")))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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


def single_process(device_preference: str = "auto") -> DistInfo:
    """One process, no process group: for building a run outside ``torchrun``."""
    return DistInfo(0, 1, 0, pick_device(device_preference))


#: What a collective's error says when a peer process died or became unreachable (gloo, NCCL).
PEER_LOST_MARKERS = (
    "connection closed by peer", "connection reset by peer", "broken pipe", "timed out", "timeout",
    "ncclremoteerror", "nccl communicator was aborted", "socket", "connection refused",
)


def lost_ranks(rank: int, world_size: int, wait_s: float = 1.5) -> list[int] | None:
    """The ranks that did not answer a roll call in the job's key-value store, or None when the
    store itself is gone. Every surviving rank writes its key, then waits up to ``wait_s``."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"emanorm/alive/{rank}", "1")
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r in range(world_size) if not store.check([f"emanorm/alive/{r}"])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.2)
    except Exception:  # the store lived with a rank that is gone: nothing more to learn
        return None


def peer_failure_message(err: BaseException, dist_info: DistInfo) -> str | None:
    """One line naming the lost rank(s) when ``err`` is a collective that failed because a peer
    died; None when ``err`` is something else (it is then raised as it is)."""
    text = str(err).lower()
    if not isinstance(err, RuntimeError) or not any(marker in text for marker in PEER_LOST_MARKERS):
        return None
    world_size = dist_info.world_size
    missing = lost_ranks(dist_info.rank, world_size)
    if missing == []:
        return None  # everyone answered: not a lost peer
    who = (
        f"rank {missing[0]}" if missing and len(missing) == 1
        else f"ranks {', '.join(map(str, missing))}" if missing
        else "another rank (the rendezvous store is gone too)"
    )
    return f"lost {who} of {world_size}: the process died or became unreachable ({first_line(err)[:160]})"
