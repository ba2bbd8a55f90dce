"""Backbones: ``build_backbone(name) -> nn.Module`` giving pooled features ``(B, feature_dim)``.

torchvision ResNets are torchvision's own classes with ``fc = nn.Identity()``, so their
``state_dict()`` loads with ``strict=True`` into ``torchvision.models.resnetXX()`` whose ``fc``
was replaced by ``nn.Identity()`` (for ``in_channels=3`` and the ImageNet stem).

``torchvision:NAME`` is any torchvision classification model (``torchvision.models.list_models
(module=torchvision.models)``) with its last ``nn.Linear`` (the classifier) replaced by
``nn.Identity()``: the features are that layer's input (``classifier_path`` names it), and a
first conv for other than 3 input channels is rebuilt with the RGB kernels summed (1 channel:
exactly the net applied to the grey channel repeated three times). ``timm:NAME`` and
``torchvision:NAME`` models are run once on a zero image of the run's size when built, so an
input too small for the network fails at once, in one line naming the smallest size that runs.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch
import torchvision
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models import resnet as tv_resnet

from emanorm.errors import first_line
from emanorm.norms import NORM_KINDS, convert_norm

BACKBONES = (
    "small",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet50x2",
    "resnet18_cifar",
    "resnet34_cifar",
    "resnet50_cifar",
    "wrn28_2",
    "timm:<name>",
    "torchvision:<name>",
)
# Builders whose model is sized for one input resolution, and the keyword that sets it.
_SIZED_BUILDERS = {"vit_": "image_size", "maxvit_": "input_size"}
# Auxiliary classifiers change the output in training mode: a backbone gives features only.
_NO_AUX = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}
_LARGEST_PROBE = 1024

_TORCHVISION = {
    "resnet18": tv_resnet.resnet18,
    "resnet34": tv_resnet.resnet34,
    "resnet50": tv_resnet.resnet50,
}


def _init_conv(conv: nn.Conv2d, nonlinearity: str = "relu") -> nn.Conv2d:
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity=nonlinearity)
    return conv


def _downsample(cin: int, cout: int, stride: int) -> nn.Module | None:
    if cin == cout and stride == 1:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class SmallResNet(nn.Module):
    """A small 3-stage residual net for 28x28 grayscale images (Fashion-MNIST on a CPU).

    Stem: 3x3 conv stride 2 (28 -> 14), 32 channels, BN, ReLU; then one torchvision
    ``BasicBlock`` per stage with 32 (14x14), 64 (7x7) and 128 (4x4) channels; global average
    pool: ``feature_dim = 128``, about 0.31M parameters. The stride-2 stem is what makes it fast.
    Measured on the 2-core development CPU, batch 256, 28x28x1, forward + backward + SGD step,
    torch 2.14: about 2,000-2,200 img/s in NCHW and 2,700-3,000 img/s with ``channels_last``
    (when no other process shares the cores); the same stages behind a stride-1 stem (stage 1 at
    28x28) ran at about 420 / 550 img/s.
    """

    def __init__(self, in_channels: int = 1, widths: tuple[int, int, int] = (32, 64, 128)) -> None:
        super().__init__()
        w0 = widths[0]
        self.stem = nn.Sequential(
            _init_conv(nn.Conv2d(in_channels, w0, 3, 2, 1, bias=False)),
            nn.BatchNorm2d(w0),
            nn.ReLU(inplace=True),
        )
        blocks, cin = [], w0
        for i, cout in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks.append(tv_resnet.BasicBlock(cin, cout, stride, _downsample(cin, cout, stride)))
            cin = cout
        self.stages = nn.Sequential(*blocks)
        for m in self.stages.modules():
            if isinstance(m, nn.Conv2d):
                _init_conv(m)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = widths[-1]

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.pool(self.stages(self.stem(x))), 1)


class _WideBlock(nn.Module):
    """Pre-activation block of a WideResNet: BN-LReLU-conv3x3-BN-LReLU-conv3x3 + shortcut.

    As in FixMatch's WRN, the projection shortcut of the first group sees the activated input
    (``activate_before_residual``); later groups project the raw input.
    """

    def __init__(self, cin: int, cout: int, stride: int, activate_before_residual: bool = False) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.act = nn.LeakyReLU(0.1, inplace=True)
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)
        self.activate_before_residual = activate_before_residual

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(x))
        residual = x
        if self.shortcut is None or self.activate_before_residual:
            residual = out
        out = self.conv2(self.act(self.bn2(self.conv1(out))))
        if self.shortcut is not None:
            residual = self.shortcut(residual)
        return out + residual


class WideResNet(nn.Module):
    """WideResNet-depth-k (Zagoruyko & Komodakis) for 32x32 inputs; WRN-28-2 has ~1.47M params.

    LeakyReLU(0.1) as in FixMatch. BN keeps PyTorch's default momentum 0.1; FixMatch code bases
    use 0.001 (TF's decay 0.999), which makes running statistics lag far behind in short runs.
    """

    def __init__(self, depth: int = 28, widen: int = 2, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        groups = []
        for g in range(3):
            blocks = []
            for i in range(n):
                first = i == 0
                cin = widths[g] if first else widths[g + 1]
                stride = 2 if first and g > 0 else 1
                blocks.append(_WideBlock(cin, widths[g + 1], stride, first and g == 0))
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(widths[3])
        self.act = nn.LeakyReLU(0.1, inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = widths[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _init_conv(m, "leaky_relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return torch.flatten(self.pool(self.act(self.bn(x))), 1)


class ResNet2x(tv_resnet.ResNet):
    """ResNet-50 (2x) of SimCLR / MoCo / EMAN: every width doubled (stem 128, bottleneck widths
    128..1024, outputs 512..4096), about 94M parameters, ``feature_dim = 4096``.

    Built as torchvision's ``ResNet`` whose ``_make_layer`` doubles ``planes``, with a 128-channel
    stem. Not torchvision's ``wide_resnet50_2``: that widens only the 3x3 bottleneck convs
    (69M parameters, 2048 features).
    """

    def __init__(self, layers: tuple[int, ...] = (3, 4, 6, 3)) -> None:
        self._widened = False
        super().__init__(tv_resnet.Bottleneck, list(layers))
        self.conv1 = _init_conv(nn.Conv2d(3, 128, 7, 2, 3, bias=False))
        self.bn1 = nn.BatchNorm2d(128)
        self.fc = nn.Linear(4096, self.fc.out_features)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):  # type: ignore[override]
        if not self._widened:  # layer1 is built first: its input is the doubled 128-channel stem
            self.inplanes, self._widened = 128, True
        return super()._make_layer(block, planes * 2, blocks, stride, dilate)


def _torchvision_resnet(name: str, in_channels: int, cifar_stem: bool) -> nn.Module:
    model = ResNet2x() if name == "resnet50x2" else _TORCHVISION[name](weights=None)
    stem_width = model.conv1.out_channels
    if cifar_stem:
        model.conv1 = _init_conv(nn.Conv2d(in_channels, stem_width, 3, 1, 1, bias=False))
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = _init_conv(nn.Conv2d(in_channels, stem_width, 7, 2, 3, bias=False))
    model.feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    return model


class MissingTimmError(ImportError, ValueError):
    """timm is not installed: an ImportError, and a ValueError so that the trainer, which turns
    a backbone's ValueError into a one-line user error, reports it without a traceback."""


def _timm_model(name: str, in_channels: int, image_size: int) -> nn.Module:
    try:
        import timm
    except ImportError as err:
        raise MissingTimmError(
            f"backbone 'timm:{name}' needs timm: pip install emanorm[timm]  (or pip install timm)"
        ) from err
    if not name:
        raise ValueError("backbone 'timm:' needs a model name, e.g. 'timm:resnet26d'")
    kwargs = {"pretrained": False, "num_classes": 0, "in_chans": in_channels}
    # Transformers need the input size; most CNNs reject the argument. ViTs also take inputs of
    # other sizes with dynamic_img_size (position embeddings resampled; unchanged at image_size):
    # DINO's local crops need it.
    attempts = ({"img_size": image_size, "dynamic_img_size": True}, {"img_size": image_size}, {})
    try:
        for extra in attempts:
            try:
                model = timm.create_model(name, **extra, **kwargs)
                break
            except TypeError:
                if not extra:
                    raise
    except Exception as err:  # an unknown name or an impossible configuration: one line
        raise ValueError(f"backbone 'timm:{name}' cannot be built: {first_line(err)}") from None
    model.feature_dim = int(model.num_features)
    return model


def torchvision_kwargs(name: str, image_size: int) -> dict:
    """The keywords ``torchvision.models.get_model(name, ...)`` gets for a backbone (weights aside)."""
    kwargs: dict = dict(_NO_AUX.get(name, {}))
    for prefix, key in _SIZED_BUILDERS.items():
        if name.startswith(prefix):
            kwargs[key] = image_size if key == "image_size" else (image_size, image_size)
    return kwargs


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Rebuild the first 3-channel conv for ``in_channels``, its kernels from the RGB ones.

    1 channel: the RGB kernels summed, i.e. the network as if the grey channel were repeated
    three times; other counts: channel ``c`` takes RGB kernel ``c % 3``, scaled by ``3 / in_channels``.
    """
    convs = [
        (path, m) for path, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.in_channels == 3 and m.groups == 1
    ]
    if not convs:
        raise ValueError(f"found no 3-channel input conv to adapt to {in_channels} channels")
    path, conv = convs[0]
    new = nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        bias=conv.bias is not None, padding_mode=conv.padding_mode,
    )
    with torch.no_grad():
        if in_channels == 1:
            new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        else:
            new.weight.copy_(conv.weight[:, [c % 3 for c in range(in_channels)]] * (3.0 / in_channels))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    model.set_submodule(path, new)


def _torchvision_model(name: str, in_channels: int, image_size: int) -> nn.Module:
    if not name:
        raise ValueError("backbone 'torchvision:' needs a model name, e.g. 'torchvision:convnext_tiny'")
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ValueError(
            f"unknown torchvision classification model {name!r}; allowed: {', '.join(available)}"
        )
    try:
        model = torchvision.models.get_model(name, weights=None, **torchvision_kwargs(name, image_size))
    except Exception as err:  # e.g. a ViT whose patch size does not divide the input: one line
        raise ValueError(
            f"backbone 'torchvision:{name}' cannot be built for {image_size}x{image_size} input: "
            f"{first_line(err)}"
        ) from None
    linears = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"backbone 'torchvision:{name}' has no linear classifier to remove; not supported")
    path, classifier = linears[-1]
    model.set_submodule(path, nn.Identity())
    model.classifier_path = path
    model.feature_dim = classifier.in_features
    if in_channels != 3:
        _adapt_first_conv(model, in_channels)
    return model


def _runs_at(model: nn.Module, in_channels: int, size: int) -> tuple[Tensor | None, str]:
    try:
        with torch.no_grad():
            return model(torch.zeros(1, in_channels, size, size)), ""
    except Exception as err:
        return None, first_line(err)


def _probe(model: nn.Module, name: str, in_channels: int, image_size: int) -> None:
    """Run ``model`` once on a zero image (eval mode, no gradient) and check its pooled features.

    A failure names the smallest input size that runs (found by bisection), in one line.
    """
    was_training = model.training
    model.eval()
    try:
        out, error = _runs_at(model, in_channels, image_size)
        if out is None:
            low, high = image_size, image_size * 2
            while high <= _LARGEST_PROBE and _runs_at(model, in_channels, high)[0] is None:
                low, high = high, high * 2
            if high > _LARGEST_PROBE:
                raise ValueError(f"backbone {name!r} fails on {image_size}x{image_size} input: {error}")
            while high - low > 1:
                middle = (low + high) // 2
                runs = _runs_at(model, in_channels, middle)[0] is not None
                low, high = (low, middle) if runs else (middle, high)
            if _runs_at(model, in_channels, high + 1)[0] is None:  # not a minimum: a fixed size or stride
                raise ValueError(f"backbone {name!r} fails on {image_size}x{image_size} input: {error}")
            raise ValueError(
                f"backbone {name!r} needs inputs of at least {high}x{high} pixels, got "
                f"{image_size}x{image_size} ({error})"
            )
        if out.dim() != 2 or out.shape[1] != model.feature_dim:
            raise ValueError(
                f"backbone {name!r} gives outputs of shape {tuple(out.shape)}, not pooled features "
                f"(1, {model.feature_dim})"
            )
    finally:
        model.train(was_training)


def build_backbone(
    name: str, *, in_channels: int = 3, image_size: int = 224, norm: str = "bn", num_groups: int = 32
) -> nn.Module:
    """Build a backbone whose ``forward(x)`` returns pooled features ``(B, backbone.feature_dim)``.

    Args:
        name: one of ``BACKBONES`` (``timm:<name>`` for any timm model, needs ``emanorm[timm]``;
            ``torchvision:<name>`` for any torchvision classification model).
        in_channels: input channels; the stem conv is rebuilt when it differs from 3.
        image_size: input resolution; transformers are built for it, and ``timm:`` /
            ``torchvision:`` models are checked on it (every other backbone takes any size).
        norm: ``bn``, ``sync_bn``, ``gn`` or ``in`` (see :func:`emanorm.norms.convert_norm`).
        num_groups: the group count for ``gn``.
    """
    if norm not in NORM_KINDS:
        raise ValueError(f"unknown norm {norm!r}; allowed: {', '.join(NORM_KINDS)}")
    if in_channels < 1 or image_size < 1:
        raise ValueError(f"in_channels and image_size must be positive, got {in_channels} and {image_size}")
    if name == "small":
        model: nn.Module = SmallResNet(in_channels)
    elif name == "wrn28_2":
        model = WideResNet(28, 2, in_channels)
    elif name in ("resnet18", "resnet34", "resnet50", "resnet50x2"):
        model = _torchvision_resnet(name, in_channels, cifar_stem=False)
    elif name in ("resnet18_cifar", "resnet34_cifar", "resnet50_cifar"):
        model = _torchvision_resnet(name.removesuffix("_cifar"), in_channels, cifar_stem=True)
    elif name.startswith("timm:"):
        model = _timm_model(name.removeprefix("timm:"), in_channels, image_size)
    elif name.startswith("torchvision:"):
        model = _torchvision_model(name.removeprefix("torchvision:"), in_channels, image_size)
    else:
        raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(BACKBONES)}")
    if norm != "bn":
        if not any(isinstance(m, _BatchNorm) for m in model.modules()):
            kinds = sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__})
            warnings.warn(
                f"backbone {name!r} has no BatchNorm layer: norm {norm!r} leaves its normalization "
                f"layers ({', '.join(kinds) or 'none'}) as they are",
                UserWarning,
                stacklevel=2,
            )
        model = convert_norm(model, norm, num_groups=num_groups)
    if name.startswith(("timm:", "torchvision:")):
        _probe(model, name, in_channels, image_size)
    return model


class Classifier(nn.Sequential):
    """``backbone`` followed by a linear layer ``fc``; ``classifier.backbone`` stays separable."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        feature_dim = int(backbone.feature_dim)
        super().__init__(OrderedDict(backbone=backbone, fc=nn.Linear(feature_dim, num_classes)))
        self.feature_dim = feature_dim
        self.num_classes = num_classes


def build_classifier(backbone: nn.Module, num_classes: int) -> Classifier:
    """Append a linear classification layer to a backbone built by :func:`build_backbone`."""
    return Classifier(backbone, num_classes)
