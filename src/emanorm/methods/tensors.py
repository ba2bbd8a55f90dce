"""Tensor helpers the methods share: a batch arranged for split BN and back, keys gathered from every
rank, masked means, and the 0-d logs a training step returns (read as floats only at log steps).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from emanorm.norms import is_distributed


def cat_for_splits(parts: Sequence[Tensor], num_splits: int = 1) -> Tensor:
    """``torch.cat(parts)``, arranged so each of ``num_splits`` equal chunks holds its share of every part.

    With split BN (one process emulating ``num_splits`` GPUs) each emulated GPU must see its
    own labeled and unlabeled samples together, as ``cat(x_local, u_local)`` would under DDP.
    """
    if num_splits <= 1:
        return torch.cat(list(parts))
    chunks = []
    for p in parts:
        if p.shape[0] % num_splits:
            raise ValueError(f"batch size {p.shape[0]} is not divisible by num_splits={num_splits}")
        chunks.append(p.reshape(num_splits, p.shape[0] // num_splits, *p.shape[1:]))
    return torch.cat(chunks, dim=1).reshape(-1, *parts[0].shape[1:])


def split_from_splits(out: Tensor, sizes: Sequence[int], num_splits: int = 1) -> list[Tensor]:
    """Undo :func:`cat_for_splits` on the outputs: one tensor per part, in the original order."""
    if num_splits <= 1:
        return list(out.split(list(sizes)))
    per = [n // num_splits for n in sizes]
    grouped = out.reshape(num_splits, sum(per), *out.shape[1:])
    return [g.reshape(-1, *out.shape[1:]) for g in grouped.split(per, dim=1)]


@torch.no_grad()
def concat_all_gather(x: Tensor) -> Tensor:
    """Every rank's ``x`` concatenated in rank order (``x`` itself on one process); no gradient."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def output_spread(outputs: Tensor) -> Tensor:
    """How spread the L2-normalised ``outputs`` are across the batch: the mean per-dimension
    standard deviation times ``sqrt(d)``; about 1 when spread over the sphere, 0 when every row is
    the same (the collapse signal of :mod:`emanorm.collapse`, SimSiam's monitor)."""
    z = torch.nn.functional.normalize(outputs.detach().float(), dim=1)
    return z.std(dim=0, correction=0).mean() * z.shape[1] ** 0.5


def log_values(**values: Tensor | float) -> dict[str, Tensor]:
    """Log values as detached 0-d tensors, without a device synchronisation.

    Tensors stay on their device (as float32, what the logs always were); Python numbers become
    float64 CPU tensors, so they read back exactly. A value that is undefined for a batch is NaN
    (``logs_to_floats`` leaves it out).
    """
    return {
        k: v.detach().float().reshape(())
        if isinstance(v, Tensor)
        else torch.tensor(float(v), dtype=torch.float64)
        for k, v in values.items()
    }


def logs_to_floats(logs: Mapping[str, Tensor | float]) -> dict[str, float]:
    """The logs as Python floats with one device synchronisation for all of them; NaN entries
    (undefined for that batch, e.g. FixMatch's ``pl_acc`` without known targets) are left out."""
    on_device = [k for k, v in logs.items() if isinstance(v, Tensor) and v.device.type != "cpu"]
    read = (
        dict(zip(on_device, torch.stack([logs[k].float() for k in on_device]).tolist(), strict=True))
        if on_device
        else {}
    )
    floats = {k: read[k] if k in read else float(v) for k, v in logs.items()}
    return {k: v for k, v in floats.items() if v == v}


def to_floats(**values: Tensor | float) -> dict[str, float]:
    """Log values as Python floats with one device synchronisation for all tensors (the built-in
    methods return :func:`log_values` instead, which never synchronises)."""
    names = [k for k, v in values.items() if isinstance(v, Tensor)]
    logs = {k: float(v) for k, v in values.items() if not isinstance(v, Tensor)}
    if names:
        stacked = torch.stack([values[k].detach().float().reshape(()) for k in names]).tolist()
        logs.update(zip(names, stacked, strict=True))
    return {k: logs[k] for k in values}


def unlabeled_targets(batch: Mapping[str, Tensor]) -> Tensor | None:
    """Ground truth of the unlabeled part for diagnostics only: ``"y_u"`` (BatchStream) or ``"u_y"``.

    Entries of -1 are unknown; ``None`` when the batch has no such key.
    """
    for key in ("y_u", "u_y"):
        if key in batch:
            return batch[key]
    return None


def masked_mean(values: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum(values * weights) / sum(weights), sum(weights))``; 0 when the weights sum to 0."""
    total = weights.sum()
    return (values * weights).sum() / total.clamp_min(1.0), total


def defined_mean(values: Tensor, weights: Tensor) -> Tensor:
    """:func:`masked_mean`, NaN when the weights sum to 0 (undefined: left out of the logs)."""
    mean, total = masked_mean(values, weights)
    return torch.where(total > 0, mean, torch.full_like(mean, float("nan")))


def batch_get(batch: Mapping[str, Tensor], key: str, method: str) -> Tensor:
    """``batch[key]`` or a ``KeyError`` that says which keys the method needs."""
    if key not in batch:
        raise KeyError(f"method {method!r} needs batch key {key!r}; got keys {sorted(batch)}")
    return batch[key]
