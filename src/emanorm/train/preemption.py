"""Preemption: SIGTERM or SIGUSR1 stops a run at a step boundary, checkpointed, resumable.

A scheduler (SLURM, Kubernetes, torchrun's agent) signals every process of a job. The handler
only notes the signal; the loop asks :meth:`StopSignals.requested` after each real step. Under
torchrun the ranks agree with one 1-element all-reduce a step (a signal seen by any rank stops
all of them after the same step), so every rank writes the same checkpoint. That all-reduce runs
on the CPU (a gloo group when training on GPUs), so reading its answer never waits for the GPU's
queue: a step stays free of host-device synchronisation (issue 29). The process then
exits with :data:`RESUMABLE_EXIT`; ``emanorm train --resume`` (or ``--resume auto``) continues
exactly from there.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

# torch-free, so the command line catches a Preempted without importing torch
from emanorm.errors import RESUMABLE_EXIT, Interrupted, Preempted, first_line  # noqa: F401 (re-exported)
from emanorm.train.distributed import collective_timeout

log = logging.getLogger("emanorm")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def stopped_message(received: str | None, step: int, checkpoint_file: Path) -> str:
    return (
        f"stopped by {received} after step {step}; checkpoint kept at {checkpoint_file}; "
        f"continue with --resume (exit status {RESUMABLE_EXIT}: resumable)"
    )


class StopSignals:
    """Context manager: SIGTERM and SIGUSR1 set a flag instead of killing the process.

    Outside the main thread (where Python cannot install handlers) it does nothing. The previous
    handlers come back on exit.
    """

    def __init__(self, device: torch.device, distributed: bool) -> None:
        self.device = device
        self.distributed = distributed
        self.received: str | None = None
        self._previous: dict[int, Any] = {}
        self._group: Any = None  # the process group of the flag's all-reduce (None: the default)

    def _note(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if self.distributed and self.device.type != "cpu":
            # collective: every rank enters here at the same point of the run
            try:
                self._group = dist.new_group(backend="gloo", timeout=collective_timeout())
            except (RuntimeError, ValueError) as err:  # gloo cannot reach the peers (its interface)
                log.warning(
                    "stop signals: no CPU (gloo) process group (%s); the ranks agree on a stop through "
                    "the device instead, which waits for its queue each step (set GLOO_SOCKET_IFNAME "
                    "to the interface NCCL uses, docs/cluster.md)", first_line(err, 200),
                )
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        # the gloo group goes with the default group (train's cleanup), which is skipped when a
        # peer died: destroying a group with a dead member may hang

    def requested(self) -> bool:
        """Whether this process, or under torchrun any rank, was signalled (same answer on all)."""
        if not self.distributed:
            return self.received is not None
        on_cpu = self._group is not None or self.device.type == "cpu"
        # on the CPU (the default gloo group, or ours beside NCCL) its .item() waits for no GPU
        flag = torch.tensor([1 if self.received else 0], device="cpu" if on_cpu else self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        stop = bool(flag.item())
        if stop and self.received is None:
            self.received = "a stop signal on another rank"
        return stop
