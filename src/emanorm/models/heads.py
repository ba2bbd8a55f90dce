"""Projection / prediction heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLPHead(nn.Module):
    """An MLP on pooled features.

    ``num_layers=2, batch_norm=False`` is MoCo v2's head (Linear-ReLU-Linear);
    ``batch_norm=True`` is BYOL's projector / predictor (Linear-BN-ReLU-Linear).
    ``last_batch_norm`` adds a BatchNorm1d after the output layer (SimSiam-style projectors);
    ``last_affine=False`` leaves that BatchNorm without scale and shift (MoCo v3's heads).
    A Linear followed by BN has no bias: the normalisation would cancel it; ``last_bias=False``
    drops the output layer's bias without a BN after it too (MoCo v3's heads have no bias at all).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 2,
        batch_norm: bool = True,
        last_batch_norm: bool = False,
        *,
        last_affine: bool = True,
        last_bias: bool | None = None,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        if min(in_dim, hidden_dim, out_dim) < 1:
            raise ValueError(f"dimensions must be positive, got {in_dim}, {hidden_dim}, {out_dim}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        bias = not last_batch_norm if last_bias is None else last_bias
        layers.append(nn.Linear(dim, out_dim, bias=bias))
        if last_batch_norm:
            layers.append(nn.BatchNorm1d(out_dim, affine=last_affine))
        self.net = nn.Sequential(*layers)
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class DINOHead(nn.Module):
    """DINO's projection head (Caron et al. 2021, Sec. 3.1 and Appendix).

    An MLP of ``num_layers`` Linear layers (GELU between them, optional BatchNorm1d), ending in a
    ``bottleneck_dim`` output that is L2-normalised, then a weight-normalised Linear without bias
    to ``out_dim`` prototypes. With ``norm_last_layer`` the weight-norm gain is fixed at 1 (not
    trained), so the last layer's rows stay unit vectors: DINO's default, which stabilises training.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        batch_norm: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        if min(in_dim, out_dim, hidden_dim, bottleneck_dim) < 1:
            raise ValueError(
                f"dimensions must be positive, got {in_dim}, {out_dim}, {hidden_dim}, {bottleneck_dim}"
            )
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for layer in self.mlp.modules():
            if isinstance(layer, nn.Linear):  # DINO's truncated-normal init, std 0.02, zero bias
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)
        self.in_dim, self.out_dim, self.bottleneck_dim = in_dim, out_dim, bottleneck_dim

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return self.last_layer(x)
