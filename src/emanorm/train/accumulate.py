"""Gradient accumulation (``--accumulate N``): one real step from N micro-batches of a batch.

:func:`emanorm.train.loop.train_step` calls :func:`accumulate_gradients` for ``accumulate`` > 1;
everything after the backward (optimizer, scheduler, teacher update) still runs once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from emanorm.errors import NonFiniteLossError, UserError


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


def accumulate_gradients(
    step_fn: Callable[..., Any] | None,
    method: nn.Module,
    batch: dict[str, torch.Tensor],
    step: int,
    optimizer: torch.optim.Optimizer,
    amp: Callable[[], Any],
    scaler: torch.amp.GradScaler | None,
    parts: int,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Forward and backward ``parts`` micro-batches of ``batch``; their gradients add up to the
    gradient of the whole batch's mean loss. Returns the mean loss and the mean of the logs.

    Under DDP the gradient all-reduce runs once, with the last micro-batch (``no_sync`` before).
    The methods keep their once-a-step work for the real step: MoCo moves its teacher with the
    first micro-batch only and enqueues every micro-batch's keys in ``after_step``.
    """
    model = method if step_fn is None else step_fn
    ddp = getattr(model, "_orig_mod", model)  # torch.compile wraps the DDP module
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=next(method.parameters()).device)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    micro_batches = split_batch(batch, parts)
    for index, micro in enumerate(micro_batches):
        last = index == parts - 1
        sync = contextlib.nullcontext() if last or not isinstance(ddp, DDP) else ddp.no_sync()
        with sync:
            with amp():
                loss, logs = model(micro, step)
            if not torch.isfinite(loss.detach()).all():
                raise NonFiniteLossError(f"loss is {loss.item()} at step {step} (micro-batch {index + 1})")
            share = loss / parts
            (scaler.scale(share) if scaler is not None else share).backward()
        total += share.detach().float()
        for key, value in logs.items():  # some logs are undefined on some micro-batches
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1
    return total, {key: value / counts[key] for key, value in sums.items()}
