"""Backbones, classifier wrapper and MLP heads."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from emanorm.models import BACKBONES, MLPHead, build_backbone, build_classifier

# name -> (input resolution for the test, feature dim); resolutions kept small for CPU.
CASES = {
    "small": (28, 128),
    "resnet18": (64, 512),
    "resnet34": (64, 512),
    "resnet50": (64, 2048),
    "resnet50x2": (32, 4096),
    "resnet18_cifar": (32, 512),
    "resnet34_cifar": (32, 512),
    "resnet50_cifar": (32, 2048),
    "wrn28_2": (32, 128),
}


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_every_listed_backbone_is_tested() -> None:
    assert set(BACKBONES) == {*CASES, "timm:<name>", "torchvision:<name>"}  # tested in test_architectures


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("in_channels", [3, 1])
def test_backbone_forward(name: str, in_channels: int) -> None:
    size, dim = CASES[name]
    torch.manual_seed(0)
    model = build_backbone(name, in_channels=in_channels, image_size=size)
    assert model.feature_dim == dim
    model.eval()  # batch 2 at 1x1 spatial size is fine in eval mode for every net
    x = torch.randn(2, in_channels, size, size)
    with torch.no_grad():
        out = model(x)
        alone = model(x[1:])
    assert out.shape == (2, dim)
    assert torch.isfinite(out).all()
    # features of the image, not of the batch (eval mode), and different images give different ones
    torch.testing.assert_close(alone, out[1:], rtol=1e-4, atol=1e-5 * float(out.abs().max()))
    assert not torch.allclose(out[0], out[1])


def test_small_backbone_trains_one_step() -> None:
    torch.manual_seed(0)
    model = build_backbone("small", in_channels=1, image_size=28)
    model.train()
    x = torch.randn(8, 1, 28, 28)
    loss = model(x).square().mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    with torch.no_grad():  # a small step against the gradient lowers the loss
        for p in model.parameters():
            p -= 1e-3 * p.grad
    assert model(x).square().mean() < loss


@pytest.mark.parametrize(("name", "expected"), [("wrn28_2", 1.47e6), ("resnet50x2", 94e6), ("small", 0.31e6)])
def test_parameter_counts(name: str, expected: float) -> None:
    assert _params(build_backbone(name)) == pytest.approx(expected, rel=0.01)


def test_resnet50x2_doubles_every_width() -> None:
    model = build_backbone("resnet50x2")
    assert model.conv1.out_channels == 128
    assert model.layer1[0].conv1.out_channels == 128  # bottleneck width 2x
    assert model.layer1[0].conv3.out_channels == 512  # block output 2x (wide_resnet50_2 keeps 256)
    assert model.layer4[-1].conv3.out_channels == 4096


def test_cifar_stem() -> None:
    model = build_backbone("resnet18_cifar")
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)


@pytest.mark.parametrize(("name", "factory"), [("resnet18", torchvision.models.resnet18),
                                               ("resnet50", torchvision.models.resnet50)])
def test_torchvision_strict_load(name: str, factory) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(name).eval()
    reference = factory(weights=None)
    reference.fc = nn.Identity()
    reference.load_state_dict(backbone.state_dict(), strict=True)
    reference.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reference(x), backbone(x))


@pytest.mark.parametrize("norm", ["bn", "sync_bn", "gn", "in"])
def test_backbone_norm_kinds(norm: str) -> None:
    model = build_backbone("small", in_channels=1, norm=norm)
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    gns = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    if norm in ("gn", "in"):
        assert not bns and gns
        assert all(m.num_channels % m.num_groups == 0 for m in gns)
        if norm == "in":
            assert all(m.num_groups == m.num_channels for m in gns)
    else:
        expected = nn.SyncBatchNorm if norm == "sync_bn" else nn.BatchNorm2d
        assert bns and all(type(m) is expected for m in bns)
    model.train()
    assert model(torch.randn(4, 1, 28, 28)).shape == (4, 128)


def test_resnet_group_norm_groups() -> None:
    model = build_backbone("resnet18", norm="gn")
    gns = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(gns) == 20 and {m.num_groups for m in gns} == {32}
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())


def test_unknown_backbone_and_norm() -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'vgg'.*resnet50x2.*wrn28_2"):
        build_backbone("vgg")
    with pytest.raises(ValueError, match=r"unknown norm 'ln'.*bn, sync_bn, gn, in"):
        build_backbone("small", norm="ln")


def test_timm_missing_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed: import fails
    with pytest.raises(ImportError, match=r"pip install emanorm\[timm\]"):
        build_backbone("timm:resnet18")


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")
def test_timm_backbone() -> None:
    model = build_backbone("timm:resnet18", in_channels=1, image_size=32).eval()
    import timm

    assert model.feature_dim == timm.create_model("resnet18", num_classes=0).num_features == 512
    with torch.no_grad():
        out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 512) and torch.isfinite(out).all() and not torch.allclose(out[0], out[1])


def test_classifier_keeps_backbone_separable() -> None:
    backbone = build_backbone("small", in_channels=1)
    clf = build_classifier(backbone, 10)
    assert clf.backbone is backbone
    assert isinstance(clf.fc, nn.Linear) and clf.fc.in_features == 128
    x = torch.randn(4, 1, 28, 28)
    clf.eval()
    torch.testing.assert_close(clf(x), clf.fc(backbone(x)))  # logits = fc(features)
    assert clf(x).shape == (4, 10)
    assert {k.split(".")[0] for k in clf.state_dict()} == {"backbone", "fc"}
    with pytest.raises(ValueError, match="num_classes"):
        build_classifier(backbone, 0)


def test_mlp_head_layouts() -> None:
    moco = MLPHead(16, 32, 8, batch_norm=False)
    assert [type(m) for m in moco.net] == [nn.Linear, nn.ReLU, nn.Linear]
    byol = MLPHead(16, 32, 8)
    assert [type(m) for m in byol.net] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    deep = MLPHead(16, 32, 8, num_layers=3, last_batch_norm=True)
    hidden = [nn.Linear, nn.BatchNorm1d, nn.ReLU]
    assert [type(m) for m in deep.net] == [*hidden, *hidden, nn.Linear, nn.BatchNorm1d]
    assert [type(m) for m in MLPHead(16, 32, 8, num_layers=1).net] == [nn.Linear]
    for head in (moco, byol, deep):
        assert head(torch.randn(4, 16)).shape == (4, 8)
    with pytest.raises(ValueError, match="num_layers"):
        MLPHead(16, 32, 8, num_layers=0)
