"""Projection / prediction heads."""

from __future__ import annotations

from torch import Tensor, nn


class MLPHead(nn.Module):
    """An MLP on pooled features.

    ``num_layers=2, batch_norm=False`` is MoCo v2's head (Linear-ReLU-Linear);
    ``batch_norm=True`` is BYOL's projector / predictor (Linear-BN-ReLU-Linear).
    ``last_batch_norm`` adds a BatchNorm1d after the output layer (SimSiam-style projectors).
    A Linear followed by BN has no bias: the normalisation would cancel it.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 2,
        batch_norm: bool = True,
        last_batch_norm: bool = False,
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
        layers.append(nn.Linear(dim, out_dim, bias=not last_batch_norm))
        if last_batch_norm:
            layers.append(nn.BatchNorm1d(out_dim))
        self.net = nn.Sequential(*layers)
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
