"""Non-finite checks that never stall a step: a device-side record read at the trainer's log steps.

Reading a tensor's value on the host (``.item()``, ``bool()``) waits for every kernel queued before
it, so a finite check after each step would drain the GPU queue each step. :class:`FiniteWatch`
instead keeps, on the device, the first step whose loss (or updated weights, or BN statistics)
was not finite, with that loss; :meth:`FiniteWatch.check` reads it (one synchronisation) and raises
:class:`NonFiniteLossError` with the message an immediate check would have given. The trainer
checks at each log step and before every checkpoint, so nothing non-finite is ever checkpointed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from emanorm.errors import NonFiniteLossError

__all__ = ["FiniteWatch", "NonFiniteLossError"]

# What went non-finite first (the codes of FiniteWatch's record).
_LOSS, _PARAMETERS, _STATISTICS = 0, 1, 2


def _all_finite(tensors: list[Tensor]) -> Tensor:
    """A 0-d bool tensor: every element of every tensor is finite (one fused norm per group)."""
    return torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all()


class FiniteWatch:
    """Remembers, on the device, the first step whose loss or weights were not finite.

    ``observe`` adds a step's losses (one per micro-batch) and its updated parameters and floating
    buffers without reading anything back; ``check`` raises :class:`NonFiniteLossError` for the
    first bad step seen so far (``loss is nan at step 7``; ``parameters became non-finite at step
    9; the loss was 0.25``; with micro-batches ``(micro-batch 2)``).
    """

    def __init__(self) -> None:
        # [step, what (_LOSS/_PARAMETERS/_STATISTICS), micro-batch (1-based, 0: no accumulation)]
        self._where: Tensor | None = None
        self._loss: Tensor | None = None  # the (first non-finite, else the step's) loss there

    def observe(
        self, step: int, losses: list[Tensor], params: list[Tensor], buffers: list[Tensor],
        *, micro_batches: bool = False,
    ) -> None:
        """Record step ``step`` if it is the first non-finite one (device-side; no synchronisation)."""
        stacked = torch.stack([loss.detach().float().reshape(()) for loss in losses])
        finite = torch.isfinite(stacked)
        first_bad = torch.argmin(finite.int())  # the first False (0 when all are finite)
        loss_ok = finite.all()
        params_ok = _all_finite(params) if params else torch.ones((), dtype=torch.bool, device=stacked.device)
        buffers_ok = _all_finite(buffers) if buffers else torch.ones_like(params_ok)
        params_ok, buffers_ok = params_ok.to(stacked.device), buffers_ok.to(stacked.device)
        what = torch.where(
            ~loss_ok, _LOSS, torch.where(~params_ok, _PARAMETERS, torch.where(~buffers_ok, _STATISTICS, -1))
        )
        micro = (first_bad + 1) if micro_batches else torch.zeros_like(first_bad)
        # the loss the message reports: the non-finite one, else the step's (mean) loss
        loss = torch.where(loss_ok, stacked.mean(), stacked.index_select(0, first_bad.reshape(1)).reshape(()))
        where = torch.stack([torch.full_like(what, step), what, micro])
        if self._where is None:
            self._where = torch.where(what >= 0, where, torch.full_like(where, -1))
            self._loss = loss
            return
        fresh = (self._where[1] < 0) & (what >= 0)  # keep the first bad step, not the latest
        self._where = torch.where(fresh, where, self._where)
        self._loss = torch.where(fresh, loss, self._loss)

    def check(self) -> None:
        """Raise :class:`NonFiniteLossError` if a step seen so far was not finite (one synchronisation)."""
        if self._where is None:
            return
        step, what, micro = self._where.tolist()
        if what < 0:
            return
        loss = float(self._loss)
        if what == _LOSS:
            suffix = f" (micro-batch {micro})" if micro else ""
            raise NonFiniteLossError(f"loss is {loss} at step {step}{suffix}")
        bad = "parameters" if what == _PARAMETERS else "BN statistics"
        raise NonFiniteLossError(f"{bad} became non-finite at step {step}; the loss was {loss:.4g}")
