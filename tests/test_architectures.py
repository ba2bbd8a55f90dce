"""torchvision:NAME / timm:NAME backbones, their one-line errors, and exports that load strict=True."""

import argparse
import copy
import importlib.util
import sys
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from emanorm.cli import evaluate as cmd
from emanorm.evaluation import context
from emanorm.evaluation.export import export_backbone, load_exported
from emanorm.evaluation.export_recipe import torchvision_recipe
from emanorm.models import build_backbone
from emanorm.norms import SplitBatchNorm2d, convert_to_split_bn

HAS_TIMM = importlib.util.find_spec("timm") is not None

# name -> (input size, feature dim): small models or small inputs, each built in well under a second
CASES = {
    "mobilenet_v3_small": (32, 1024),
    "regnet_x_400mf": (32, 400),
    "efficientnet_b0": (32, 1280),
    "convnext_tiny": (32, 768),
    "shufflenet_v2_x0_5": (32, 1024),
}


@pytest.mark.parametrize("name", list(CASES))
def test_torchvision_backbones_give_pooled_features(name):
    size, dim = CASES[name]
    model = build_backbone(f"torchvision:{name}", in_channels=1, image_size=size)
    assert model.feature_dim == dim
    model.train()
    out = model(torch.randn(2, 1, size, size))
    assert out.shape == (2, dim) and torch.isfinite(out).all() and not torch.allclose(out[0], out[1])
    out.square().mean().backward()  # the features train the whole network, stem included
    stem = next(p for p in model.parameters() if p.ndim == 4)
    assert stem.shape[1] == 1 and stem.grad is not None and stem.grad.abs().sum() > 0


def test_one_channel_stem_is_the_grey_image_repeated():
    torch.manual_seed(0)
    rgb = build_backbone("torchvision:regnet_x_400mf", in_channels=3, image_size=32).eval()
    torch.manual_seed(0)
    grey = build_backbone("torchvision:regnet_x_400mf", in_channels=1, image_size=32).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm", ["gn", "in"])
def test_norm_conversions_on_torchvision_models_with_batch_norm(norm):
    # 64 px: instance norm needs more than one value per channel at the last stage
    model = build_backbone("torchvision:efficientnet_b0", in_channels=1, image_size=64, norm=norm)
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())


def test_norm_on_a_model_without_batch_norm_says_what_it_did():
    with pytest.warns(UserWarning, match=r"no BatchNorm layer: norm 'gn' leaves .*LayerNorm"):
        build_backbone("torchvision:convnext_tiny", image_size=32, norm="gn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_backbone("torchvision:convnext_tiny", image_size=32)


def test_one_line_errors():
    with pytest.raises(ValueError, match=r"needs inputs of at least 32x32 pixels, got 8x8") as err:
        build_backbone("torchvision:convnext_tiny", image_size=8)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"cannot be built for 28x28 input: .*patch size"):
        build_backbone("torchvision:vit_b_16", image_size=28)
    with pytest.raises(ValueError, match=r"unknown torchvision classification model 'vgg2'; allowed: alex"):
        build_backbone("torchvision:vgg2")
    with pytest.raises(ValueError, match="no linear classifier"):
        build_backbone("torchvision:squeezenet1_1", image_size=64)
    with pytest.raises(ValueError, match="needs a model name"):
        build_backbone("torchvision:")


@pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed")
def test_timm_errors_are_one_line():
    with pytest.raises(ValueError, match=r"'timm:convnext_atto' needs inputs of at least 32x32 pixels"):
        build_backbone("timm:convnext_atto", in_channels=1, image_size=28)
    with pytest.raises(ValueError, match=r"'timm:no_such_net' cannot be built: Unknown model"):
        build_backbone("timm:no_such_net")


def _load_recipe(recipe: str, state: dict | None = None) -> nn.Module:
    """Run the printed recipe as a user would paste it; ``state``: load that instead of the file."""
    namespace = {"torch": torch, "torchvision": torchvision}
    if state is not None:
        recipe, _, load = recipe.rpartition("; ")
        assert load.startswith("m.load_state_dict(torch.load(")
    exec(recipe, namespace)
    if state is not None:
        namespace["m"].load_state_dict(state)  # strict by default
    return namespace["m"].eval()


@pytest.mark.parametrize(
    ("arch", "channels", "size", "norm"),
    [
        ("torchvision:vit_b_16", 1, 32, "bn"),
        ("torchvision:convnext_tiny", 3, 32, "bn"),
        ("resnet18", 1, 32, "bn"),  # failed strict=True before: the 1-channel conv1 was not in the recipe
        ("resnet18_cifar", 1, 32, "gn"),
        ("torchvision:efficientnet_b0", 1, 64, "in"),
    ],
)
def test_exported_backbones_load_strict_with_the_printed_recipe(tmp_path, arch, channels, size, norm):
    torch.manual_seed(0)
    backbone = build_backbone(arch, in_channels=channels, image_size=size, norm=norm).eval()
    big = arch.startswith("torchvision:vit")  # 86M parameters: checked in memory, not through a file
    path = tmp_path / "b.pth" if big else export_backbone(backbone, tmp_path / "b.pth")
    recipe = torchvision_recipe(backbone, arch, path, image_size=size)
    assert recipe is not None
    assert recipe.endswith(f"m.load_state_dict(torch.load('{path}', weights_only=True))")
    model = _load_recipe(recipe, backbone.state_dict() if big else None)
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        assert torch.equal(model(x), backbone(x))


def test_recipe_for_three_channel_resnet_is_unchanged_and_none_without_torchvision_twin(tmp_path):
    backbone = build_backbone("resnet18")
    assert torchvision_recipe(backbone, "resnet18", "P.pth") == (
        "m = torchvision.models.resnet18(); m.fc = torch.nn.Identity(); "
        "m.load_state_dict(torch.load('P.pth', weights_only=True))"
    )
    assert torchvision_recipe(build_backbone("small", in_channels=1), "small", "P.pth") is None


def test_export_command_prints_the_recipe(tmp_path, monkeypatch, capsys):
    def load_backbone(path, which):
        backbone = build_backbone("torchvision:convnext_tiny", in_channels=1, image_size=32).eval()
        return backbone, {"backbone": "torchvision:convnext_tiny", "dataset_info": {"image_size": 32}}

    monkeypatch.setattr(context, "load_backbone", load_backbone)
    parser = argparse.ArgumentParser()
    cmd.add_export_parser(parser.add_subparsers())
    args = parser.parse_args(["export", str(tmp_path), "--out", str(tmp_path / "b.pth")])
    assert args.func(args) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("load: "))
    model = _load_recipe(line.removeprefix("load: "))
    assert model.state_dict().keys() == load_exported(tmp_path / "b.pth").keys()


def test_split_and_sync_batch_norm_on_torchvision_models():
    torch.manual_seed(0)
    plain = build_backbone("torchvision:regnet_x_400mf", image_size=32)
    model = convert_to_split_bn(copy.deepcopy(plain), 2)
    assert any(isinstance(m, SplitBatchNorm2d) for m in model.modules())
    x = torch.randn(4, 3, 32, 32)
    x[2:] = x[2:] * 2 + 1  # halves with different statistics
    with torch.no_grad():
        # eval mode is the plain model; training mode normalises each half by its own statistics
        torch.testing.assert_close(model.eval()(x), plain.eval()(x))
        out = model.train()(x)
        assert out.shape == (4, 400) and not torch.allclose(out, plain.train()(x), atol=1e-4)
    synced = build_backbone("torchvision:mobilenet_v3_small", image_size=32, norm="sync_bn")
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())


def test_missing_timm_is_a_value_error_too(monkeypatch):
    """The trainer turns a backbone's ValueError into one line: a missing timm must be one too."""
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(ValueError, match=r"pip install emanorm\[timm\]"):
        build_backbone("timm:resnet18")
    with pytest.raises(ImportError):
        build_backbone("timm:resnet18")
