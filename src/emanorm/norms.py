"""Normalization layers: conversion between BN / SyncBN / GN / IN, split BN and ShuffleBN.

Choices made here (the rest of the package relies on them):

* ``"in"`` is ``nn.GroupNorm(C, C)``: one group per channel is instance normalisation with a
  per-channel affine, it has no buffers (nothing for an EMA teacher to average) and it accepts
  any ``(N, C, *)`` input. It is numerically the same as
  ``nn.InstanceNorm2d(C, affine=True, track_running_stats=False)``.
* ``"gn"`` uses the largest divisor of ``C`` that is at most ``num_groups``, so every width is
  valid (``C=48, num_groups=32`` gives 24 groups; ``C=16`` gives 16).
* ``BatchNorm1d`` (projector / predictor heads) is converted too, because the point of the GN
  and IN variants is a network with no cross-sample dependency anywhere. On ``(N, C)`` features
  ``"gn"`` is ``GroupNorm(groups, C)`` (normalises each sample over groups of features; at least
  8 features per group, since a group of one feature would normalise to zero), while
  ``"in"`` becomes ``GroupNorm(1, C)`` (layer normalisation with a per-feature affine): instance
  normalisation of a single value per channel would output the bias alone and erase the input.
* ``"bn"`` turns ``SyncBatchNorm`` and ``SplitBatchNorm{1,2}d`` back into plain ``BatchNorm{1,2,3}d``
  (running statistics kept); other layers are left alone.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from emanorm.catalog import NORM_KINDS

# Remembers which plain class a SyncBatchNorm came from, so "bn" can restore it.
_SOURCE_ATTR = "_emanorm_bn_class"
_MIN_1D_GROUP = 8
_PLAIN_BN = {"BatchNorm1d": nn.BatchNorm1d, "BatchNorm2d": nn.BatchNorm2d, "BatchNorm3d": nn.BatchNorm3d}


def group_count(channels: int, num_groups: int) -> int:
    """The largest divisor of ``channels`` that is at most ``num_groups`` (always valid for GN)."""
    if channels < 1 or num_groups < 1:
        raise ValueError(f"channels and num_groups must be positive, got {channels} and {num_groups}")
    for groups in range(min(channels, num_groups), 0, -1):
        if channels % groups == 0:
            return groups
    return 1  # unreachable: 1 divides everything


def _plain_bn_class(layer: _BatchNorm) -> type[_BatchNorm]:
    if isinstance(layer, SplitBatchNorm2d):
        return nn.BatchNorm2d
    if isinstance(layer, SplitBatchNorm1d):
        return nn.BatchNorm1d
    if isinstance(layer, nn.SyncBatchNorm):
        return _PLAIN_BN.get(getattr(layer, _SOURCE_ATTR, "BatchNorm2d"), nn.BatchNorm2d)
    return type(layer)


def _copy_bn_state(src: _BatchNorm, dst: _BatchNorm) -> _BatchNorm:
    """Copy affine parameters and running statistics; keep device, dtype and requires_grad."""
    with torch.no_grad():
        if src.affine:
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
            dst.weight.requires_grad_(src.weight.requires_grad)
            dst.bias.requires_grad_(src.bias.requires_grad)
        if src.track_running_stats:
            dst.running_mean.copy_(src.running_mean)
            dst.running_var.copy_(src.running_var)
            dst.num_batches_tracked.copy_(src.num_batches_tracked)
    dst.train(src.training)
    return dst


def _factory(layer: _BatchNorm) -> dict:
    ref = layer.weight if layer.affine else layer.running_mean
    return {} if ref is None else {"device": ref.device, "dtype": ref.dtype}


def _to_group_norm(layer: _BatchNorm, kind: str, num_groups: int) -> nn.GroupNorm:
    channels = layer.num_features
    one_d = isinstance(layer, nn.BatchNorm1d) or getattr(layer, _SOURCE_ATTR, "") == "BatchNorm1d"
    if kind == "in":  # one group per channel, except GroupNorm(1, C) on 1d features (module docstring)
        groups = 1 if one_d else channels
    else:  # on 1d features a group is its features alone: keep at least _MIN_1D_GROUP of them
        limit = max(1, min(num_groups, channels // _MIN_1D_GROUP)) if one_d else num_groups
        groups = group_count(channels, limit)
    gn = nn.GroupNorm(groups, channels, eps=layer.eps, affine=layer.affine, **_factory(layer))
    if layer.affine:
        with torch.no_grad():
            gn.weight.copy_(layer.weight)
            gn.bias.copy_(layer.bias)
        gn.weight.requires_grad_(layer.weight.requires_grad)
        gn.bias.requires_grad_(layer.bias.requires_grad)
    gn.train(layer.training)
    return gn


def _check_convertible(layer: _BatchNorm, kind: str) -> None:
    # A BN subclass with its own forward (timm's BatchNormAct2d adds an activation) would lose
    # that behaviour if replaced by a plain layer: refuse rather than change the network silently.
    known = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, SplitBatchNorm2d,
             SplitBatchNorm1d)
    if type(layer) not in known:
        raise ValueError(
            f"cannot convert {type(layer).__module__}.{type(layer).__name__} to {kind!r}: only "
            f"{', '.join(c.__name__ for c in known)} are converted; build the model with the norm you need"
        )


def _convert_layer(layer: _BatchNorm, kind: str, num_groups: int) -> nn.Module:
    if kind == "bn" and not isinstance(layer, nn.SyncBatchNorm | _SplitBatchNorm):
        return layer  # already a BatchNorm; subclasses such as timm's BatchNormAct2d stay as they are
    _check_convertible(layer, kind)
    if kind in ("gn", "in"):
        return _to_group_norm(layer, kind, num_groups)
    if kind == "sync_bn":
        if isinstance(layer, nn.SyncBatchNorm):
            return layer
        sync = nn.SyncBatchNorm(layer.num_features, layer.eps, layer.momentum, layer.affine,
                                layer.track_running_stats, **_factory(layer))
        setattr(sync, _SOURCE_ATTR, _plain_bn_class(layer).__name__)
        return _copy_bn_state(layer, sync)
    # kind == "bn": a SyncBatchNorm or split BN back to plain BN
    cls = _plain_bn_class(layer)
    bn = cls(layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats,
             **_factory(layer))
    return _copy_bn_state(layer, bn)


def convert_norm(module: nn.Module, kind: str, *, num_groups: int = 32) -> nn.Module:
    """Replace every BatchNorm (plain, Sync, Split; 1d/2d/3d) of ``module`` by ``kind``.

    ``kind`` is one of ``bn``, ``sync_bn``, ``gn``, ``in``; affine weights are copied, and running
    statistics too between BN variants. Works in place on children and returns the module (a
    new one when ``module`` itself is a BatchNorm).
    """
    if kind not in NORM_KINDS:
        raise ValueError(f"unknown norm kind {kind!r}; allowed: {', '.join(NORM_KINDS)}")
    if num_groups < 1:
        raise ValueError(f"num_groups must be positive, got {num_groups}")
    if isinstance(module, _BatchNorm):
        return _convert_layer(module, kind, num_groups)
    for name, child in module.named_children():
        new = convert_norm(child, kind, num_groups=num_groups)
        if new is not child:
            setattr(module, name, new)
    return module


class _SplitBatchNorm(_BatchNorm):
    """Training statistics from ``num_splits`` equal chunks of the batch (any ``(N, C, *)`` input).

    Emulates ``num_splits`` GPUs each running plain BN on its own share (MoCo's single-device
    ShuffleBN, the paper's per-GPU BN). Chunk ``i`` is samples ``[i*n, (i+1)*n)`` with
    ``n = N // num_splits``. The running statistics are ordinary buffers, updated with the mean
    over the splits of each split's statistics, so an EMA teacher can average them like any BN.
    Eval mode is plain BN.
    """

    def __init__(self, num_features: int, num_splits: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        if int(num_splits) < 1:
            raise ValueError(f"num_splits must be a positive integer, got {num_splits}")
        self.num_splits = int(num_splits)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        self._check_input_dim(x)
        n, c = x.shape[:2]
        s = self.num_splits
        if n % s != 0:
            raise ValueError(f"{type(self).__name__}: batch size {n} is not divisible by num_splits={s}")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average, as in nn.BatchNorm
                factor = 1.0 / float(self.num_batches_tracked)
        # Each split is a contiguous chunk of the batch (in NCHW and channels_last alike): plain BN
        # on each, with its own copy of the running statistics, then their mean. The only copy of
        # the activations is the output's concatenation (and its gradient's, backward).
        track = self.track_running_stats
        runs_mean = self.running_mean.expand(s, c).clone() if track else None
        runs_var = self.running_var.expand(s, c).clone() if track else None
        outs = [
            F.batch_norm(chunk, runs_mean[i] if track else None, runs_var[i] if track else None,
                         self.weight, self.bias, True, factor, self.eps)
            for i, chunk in enumerate(x.split(n // s))
        ]
        if track:
            with torch.no_grad():
                self.running_mean.copy_(runs_mean.mean(0))
                self.running_var.copy_(runs_var.mean(0))
        return torch.cat(outs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


class SplitBatchNorm2d(_SplitBatchNorm, nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics come from ``num_splits`` equal chunks of the batch."""


class SplitBatchNorm1d(_SplitBatchNorm, nn.BatchNorm1d):
    """``BatchNorm1d`` (``(N, C)`` or ``(N, C, L)``) with statistics per chunk: split heads' BN."""


_SPLIT_OF = {nn.BatchNorm2d: SplitBatchNorm2d, nn.BatchNorm1d: SplitBatchNorm1d}


def convert_to_split_bn(module: nn.Module, num_splits: int, *, one_d: bool = False) -> nn.Module:
    """Replace every ``BatchNorm2d`` (and with ``one_d`` every ``BatchNorm1d``) by its split form.

    State is kept. Without ``one_d``, ``BatchNorm1d`` layers (heads) stay as they are: ShuffleBN
    splits the backbone as in MoCo's CIFAR demo. ``one_d=True`` splits the heads' ``BatchNorm1d``
    too, as every BN layer is per GPU in a multi-GPU run (``bn_splits``). An existing split layer
    gets the new ``num_splits``.
    """
    if int(num_splits) < 1:
        raise ValueError(f"num_splits must be a positive integer, got {num_splits}")
    if isinstance(module, _SplitBatchNorm):
        module.num_splits = int(num_splits)
        return module
    kinds = (nn.BatchNorm2d, nn.BatchNorm1d) if one_d else (nn.BatchNorm2d,)
    if isinstance(module, kinds):
        _check_convertible(module, "split_bn")
        cls = _SPLIT_OF[nn.BatchNorm2d if isinstance(module, nn.BatchNorm2d) else nn.BatchNorm1d]
        split = cls(module.num_features, num_splits, module.eps, module.momentum, module.affine,
                    module.track_running_stats, **_factory(module))
        return _copy_bn_state(module, split)
    for name, child in module.named_children():
        new = convert_to_split_bn(child, num_splits, one_d=one_d)
        if new is not child:
            setattr(module, name, new)
    return module


# -- ShuffleBN --------------------------------------------------------------------------------
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def _gather(x: Tensor) -> Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def shuffle_batch(x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Shuffle a batch across all ranks (MoCo's ShuffleBN); returns ``(x_shuffled, unshuffle_index)``.

    On one process: a random permutation of the batch. Under ``torch.distributed`` with several
    ranks: the batches of all ranks are gathered, rank 0 draws one permutation and broadcasts it,
    and each rank keeps its slice. Every rank must pass the same batch size. Meant for the
    gradient-free teacher/key path: no gradient flows through the gather.
    """
    rank, world = _world()
    if world == 1:
        perm = torch.randperm(x.shape[0], device=x.device, generator=generator)
        return x[perm], torch.argsort(perm)
    local = x.shape[0]
    x_all = _gather(x)
    perm = torch.randperm(x_all.shape[0], device=x.device, generator=generator)
    dist.broadcast(perm, src=0)
    keep = slice(rank * local, (rank + 1) * local)
    return x_all[perm[keep]], torch.argsort(perm)[keep]


@torch.no_grad()
def unshuffle_batch(y: Tensor, unshuffle_index: Tensor) -> Tensor:
    """Undo :func:`shuffle_batch` on the outputs ``y`` (gathers across ranks when distributed)."""
    _, world = _world()
    if world == 1:
        return y[unshuffle_index]
    return _gather(y)[unshuffle_index]


def is_distributed() -> bool:
    """True under an initialised ``torch.distributed`` group with more than one rank."""
    return _world()[1] > 1


__all__ = [
    "NORM_KINDS",
    "SplitBatchNorm1d",
    "SplitBatchNorm2d",
    "convert_norm",
    "convert_to_split_bn",
    "group_count",
    "is_distributed",
    "shuffle_batch",
    "unshuffle_batch",
]


# -- statistics across ranks ------------------------------------------------------------------
def average_batchnorm_statistics(module: nn.Module) -> None:
    """Make every rank's BN running statistics their mean, in one all-reduce.

    Local BN leaves each rank with its own statistics; averaging them (a few KB a step) keeps the
    student's and the teacher's statistics identical on every rank, without DDP's buffer
    broadcast, which would overwrite them with rank 0's alone.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    stats = [
        buf
        for layer in module.modules()
        if isinstance(layer, _BatchNorm) and layer.track_running_stats
        for buf in (layer.running_mean, layer.running_var)
    ]
    # one all-reduce per dtype, in the buffers' own precision (float64 stays float64; half
    # precision statistics are averaged in float32)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buf in stats:
        by_dtype.setdefault(torch.promote_types(buf.dtype, torch.float32), []).append(buf)
    for dtype, group in by_dtype.items():
        flat = torch.cat([s.reshape(-1).to(dtype) for s in group])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for s in group:
            n = s.numel()
            s.copy_(flat[offset : offset + n].view_as(s))
            offset += n
