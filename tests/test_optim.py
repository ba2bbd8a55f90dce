"""LARS, parameter groups and the optimiser builder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from emanorm.models import MLPHead
from emanorm.optim import LARS, build_optimizer, parameter_groups


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.gn = nn.GroupNorm(2, 4)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.ln = nn.LayerNorm(4)
        # BYOL-style projector: its BatchNorm1d is called "net.1", no "bn" in the name.
        self.projector = MLPHead(4, 16, 8)
        self.frozen = nn.Linear(8, 2)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.ln(self.pool(self.inorm(self.gn(self.conv(x))))))


def _names(module: nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in module.named_parameters() if id(p) in ids}


def test_parameter_groups_exclude_norms_by_type_and_biases() -> None:
    net = _Net()
    decay, no_decay = parameter_groups(net, 1e-4, exclude_bias_and_norm=True)
    assert decay["weight_decay"] == 1e-4 and decay["lars_exclude"] is False
    assert no_decay["weight_decay"] == 0.0 and no_decay["lars_exclude"] is True
    assert _names(net, decay) == {"conv.weight", "projector.net.0.weight", "projector.net.3.weight"}
    assert _names(net, no_decay) == {
        "gn.weight", "gn.bias", "inorm.weight", "inorm.bias", "ln.weight", "ln.bias",
        "projector.net.1.weight", "projector.net.1.bias",  # the head's BatchNorm1d
        "projector.net.3.bias",
    }
    # Frozen parameters are left out; every trainable one appears exactly once.
    assert len(decay["params"]) + len(no_decay["params"]) == sum(p.requires_grad for p in net.parameters())


def test_parameter_groups_without_exclusion_is_one_group() -> None:
    net = _Net()
    (group,) = parameter_groups(net, 0.5)
    assert group["weight_decay"] == 0.5 and group["lars_exclude"] is False
    assert len(group["params"]) == sum(p.requires_grad for p in net.parameters())


def _lars_reference(w: torch.Tensor, g: torch.Tensor, lr: float, wd: float, eta: float) -> torch.Tensor:
    trust = eta * w.norm() / (g.norm() + wd * w.norm())
    return w - lr * trust * (g + wd * w)


def test_lars_step_and_exclusion() -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, 3))
    b = nn.Parameter(torch.randn(5))
    gw, gb = torch.randn(5, 3), torch.randn(5)
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt = LARS([{"params": [w]}, {"params": [b], "lars_exclude": True, "weight_decay": 0.1}],
               lr=0.5, momentum=0.9, weight_decay=0.01, eta=0.02)
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    torch.testing.assert_close(w.detach(), _lars_reference(w0, gw, 0.5, 0.01, 0.02))
    # Excluded: plain SGD, no trust ratio and no weight decay even though the group sets one.
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb)
    # Second step: momentum buffers carry the first update.
    w1, b1 = w.detach().clone(), b.detach().clone()
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    first = (gw + 0.01 * w0) * 0.02 * w0.norm() / (gw.norm() + 0.01 * w0.norm())
    second = (gw + 0.01 * w1) * 0.02 * w1.norm() / (gw.norm() + 0.01 * w1.norm())
    torch.testing.assert_close(w.detach(), w1 - 0.5 * (0.9 * first + second))
    torch.testing.assert_close(b.detach(), b1 - 0.5 * (0.9 * gb + gb))


def test_lars_zero_weight_uses_trust_one() -> None:
    w = nn.Parameter(torch.zeros(4))
    w.grad = torch.ones(4)
    LARS([w], lr=0.1, momentum=0.0, weight_decay=0.0).step()
    torch.testing.assert_close(w.detach(), torch.full((4,), -0.1))


def test_lars_with_parameter_groups_trains() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
    x, y = torch.randn(64, 6), torch.randn(64, 1)
    opt = build_optimizer(parameter_groups(model, 1e-6, exclude_bias_and_norm=True), "lars",
                          lr=1.0, momentum=0.9, weight_decay=1e-6)
    losses = []
    for _ in range(30):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_build_optimizer() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    groups = parameter_groups(model, 1e-4, exclude_bias_and_norm=True)
    sgd = build_optimizer(groups, "sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"] is True
    assert [g["weight_decay"] for g in sgd.param_groups] == [1e-4, 0.0]  # group values win
    assert isinstance(build_optimizer(groups, "lars", 0.1, 0.9, 1e-6), LARS)
    adamw = build_optimizer(model.parameters(), "adamw", lr=1e-3, momentum=0.9, weight_decay=0.05)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.05
    with pytest.raises(ValueError, match="unknown optimizer 'adam'; allowed: sgd, lars, adamw"):
        build_optimizer(groups, "adam", 0.1, 0.9, 0.0)
