"""Optimisers: LARS, parameter groups that exclude bias / norm parameters, and a builder."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

OPTIMIZERS = ("sgd", "lars", "adamw")

# Normalization layers, found by type so that BN inside MLP heads is caught whatever its name.
# Subclasses count too (SyncBatchNorm, SplitBatchNorm2d, timm's BatchNormAct2d / LayerNorm2d).
NORM_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    _BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    _InstanceNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017, as used by BYOL / SimCLR).

    For each parameter ``w`` with gradient ``g``:
    ``update = (g + wd * w) * eta * ||w|| / (||g|| + wd * ||w||)`` (trust ratio 1 when either norm
    is 0), then ``buf = momentum * buf + update`` and ``w -= lr * buf`` (Nesterov optional).
    A param group with ``lars_exclude=True`` (biases, norm layers) gets neither weight decay nor
    the trust ratio: it is plain momentum SGD. A group with ``trust_of_update=True`` divides by
    the norm of the decayed gradient instead, ``eta * ||w|| / ||g + wd * w||`` (MoCo v3's LARS).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 1e-3,
        nesterov: bool = False,
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        if weight_decay < 0 or eta <= 0:
            raise ValueError(f"weight_decay must be >= 0 and eta > 0, got {weight_decay} and {eta}")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta,
                    "nesterov": nesterov, "lars_exclude": False, "trust_of_update": False}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, eta, momentum = group["weight_decay"], group["eta"], group["momentum"]
            exclude = group["lars_exclude"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not exclude and group["trust_of_update"]:
                    grad = grad.add(p, alpha=wd) if wd else grad
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(grad)
                    ratio = eta * w_norm / u_norm
                    trust = torch.where((w_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))
                    grad = grad.mul(trust)
                elif not exclude:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(grad)
                    ratio = eta * w_norm / (g_norm + wd * w_norm)
                    trust = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
                    grad = grad.add(p, alpha=wd).mul_(trust) if wd else grad.mul(trust)
                state = self.state[p]
                if momentum:
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = grad.detach().clone()
                    else:
                        buf.mul_(momentum).add_(grad)
                    grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
                p.add_(grad, alpha=-group["lr"])
        return loss


def parameter_groups(
    module: nn.Module, weight_decay: float, exclude_bias_and_norm: bool = False, *, exclude_1d: bool = False
) -> list[dict]:
    """Optimiser parameter groups for ``module`` (trainable parameters only, each once).

    With ``exclude_bias_and_norm``, every bias and every parameter of a normalization layer
    (found by module type: any BatchNorm incl. BatchNorm1d in heads, GroupNorm, LayerNorm,
    InstanceNorm) goes into a group with ``weight_decay=0`` and ``lars_exclude=True``; the rest
    gets ``weight_decay``. ``exclude_1d`` adds DINO's rule: every bias and every 1-D parameter
    (a ViT's class token and position embedding are not 1-D and keep their decay, as in DINO).
    Without either, one group holds everything. Empty groups are dropped.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    excluded: set[int] = set()
    if exclude_bias_and_norm:
        for sub in module.modules():
            is_norm = isinstance(sub, NORM_LAYER_TYPES)
            for name, p in sub.named_parameters(recurse=False):
                if is_norm or name == "bias":
                    excluded.add(id(p))
    if exclude_1d:  # DINO's get_params_groups: every bias and every 1-D parameter
        for name, p in module.named_parameters():
            if name.endswith(".bias") or p.ndim == 1:
                excluded.add(id(p))
    decay, no_decay, seen = [], [], set()
    for p in module.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if id(p) in excluded else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lars_exclude": False, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    groups: Iterable[Any],
    name: str,
    lr: float,
    momentum: float,
    weight_decay: float,
    nesterov: bool = False,
    *,
    eta: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """Build ``sgd``, ``lars`` or ``adamw`` over ``groups`` (parameters or parameter groups).

    A group's own ``weight_decay`` (as set by :func:`parameter_groups`) overrides ``weight_decay``.
    ``momentum`` and ``nesterov`` do not apply to AdamW (``betas`` does).
    """
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, nesterov=nesterov)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")


__all__ = ["LARS", "NORM_LAYER_TYPES", "OPTIMIZERS", "build_optimizer", "parameter_groups"]
