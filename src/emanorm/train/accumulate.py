"""One step's forwards and backwards (``--accumulate N``: N micro-batches of a batch).

:func:`emanorm.train.loop.train_step` calls :func:`forward_backward`; everything after the
backward (``before_optimizer_step``, optimizer, scheduler, teacher update) still runs once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from emanorm.errors import NonFiniteLossError, UserError


def unwrap(model: nn.Module) -> nn.Module:
    """The module under ``torch.compile`` (``_orig_mod``) and DDP (``module``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, DDP):
            inner = model.module
        if inner is None:
            return model
        model = inner


def split_batch(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """``parts`` micro-batches of equal size: every tensor of ``batch`` cut along its first axis
    (0-d tensors such as the batch's ``epoch`` go to every micro-batch as they are)."""
    for key, value in batch.items():
        if value.dim() and value.shape[0] % parts:
            raise UserError(
                f"--accumulate {parts} does not divide the {key!r} batch of {value.shape[0]} on this "
                "process; choose a batch size divisible by accumulate x processes"
            )
    pieces = {key: value.chunk(parts) if value.dim() else (value,) * parts for key, value in batch.items()}
    return [{key: chunks[i] for key, chunks in pieces.items()} for i in range(parts)]


def _log_tensor(value: torch.Tensor | float) -> torch.Tensor:
    """A log value as a detached 0-d tensor (a Python number as float64 on the CPU: exact)."""
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(())
    return torch.tensor(float(value), dtype=torch.float64)


def forward_backward(
    step_fn: Callable[..., Any] | None,
    method: nn.Module,
    batch: dict[str, torch.Tensor],
    step: int,
    optimizer: torch.optim.Optimizer,
    amp: Callable[[], Any],
    scaler: torch.amp.GradScaler | None,
    parts: int,
    *,
    check_now: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
    """Forward and backward ``parts`` micro-batches of ``batch`` (``parts`` <= 1: the whole batch);
    their gradients add up to the gradient of the whole batch's mean loss. Returns the mean loss,
    the logs (each the mean over the micro-batches where it is defined, i.e. not NaN) and every
    micro-batch's loss, all detached. ``check_now``: check each loss before its backward.

    Under DDP the gradient all-reduce runs once, with the last micro-batch (``no_sync`` before).
    Each method keeps its once-a-step work for the real step (``Method.stash``): MoCo moves its
    teacher with the first micro-batch only and enqueues every micro-batch's keys in
    ``after_step``; DINO moves its centre with every micro-batch's teacher outputs.
    """
    model = method if step_fn is None else step_fn
    ddp = getattr(model, "_orig_mod", model)  # torch.compile wraps the DDP module
    micro_batches = [batch] if parts <= 1 else split_batch(batch, parts)
    optimizer.zero_grad(set_to_none=True)
    losses: list[torch.Tensor] = []
    all_logs: list[dict[str, Any]] = []
    for index, micro in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not isinstance(ddp, DDP) else ddp.no_sync()
        with sync:
            with amp():
                loss, logs = model(micro, step)
            if check_now and not torch.isfinite(loss.detach()).all():  # before its backward: nothing touched
                where = f" (micro-batch {index + 1})" if parts > 1 else ""
                raise NonFiniteLossError(f"loss is {loss.item()} at step {step}{where}")
            share = loss / parts if parts > 1 else loss  # one batch: the loss itself, bit for bit
            (scaler.scale(share) if scaler is not None else share).backward()
        losses.append(loss.detach())
        all_logs.append(logs)
    if len(micro_batches) == 1:
        return losses[0], {k: _log_tensor(v) for k, v in all_logs[0].items()}, losses
    return _mean_of_micro_batches(losses, all_logs, parts)


def _mean_of_micro_batches(
    losses: list[torch.Tensor], all_logs: list[dict[str, Any]], parts: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
    """The step's loss and logs from its micro-batches' (the logs' NaN entries are undefined ones)."""
    # (the micro-batches' mean of the losses: sum of loss / parts, as the gradients are)
    total = torch.stack([loss / parts for loss in losses]).sum()
    keys = list(dict.fromkeys(k for logs in all_logs for k in logs))
    means = {
        key: torch.nanmean(torch.stack([_log_tensor(logs[key]) for logs in all_logs if key in logs]))
        for key in keys
    }
    return total, means, losses
