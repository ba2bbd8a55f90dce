"""The Python that loads an exported backbone into ``torchvision.models`` with ``strict=True``.

Kept apart from :mod:`emanorm.evaluation.export` (which needs torch only) because it builds
torchvision models to derive and check the recipe.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from emanorm.evaluation.export import exported_tensors
from emanorm.models.backbones import torchvision_kwargs
from emanorm.norms import convert_norm

# emanorm backbone names that are torchvision models (the _cifar ones with a 3x3 stem, no max-pool)
_TORCHVISION_NAMES = (
    "resnet18", "resnet34", "resnet50", "resnet18_cifar", "resnet34_cifar", "resnet50_cifar",
)


def _attribute(path: str) -> str:
    """``classifier.2`` -> ``m.classifier[2]``: the Python expression of a submodule."""
    return "m" + "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in path.split("."))


def _conv_config(conv: nn.Conv2d) -> tuple:
    return (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)


def _conv_expression(conv: nn.Conv2d) -> str:
    text = (f"torch.nn.Conv2d({conv.in_channels}, {conv.out_channels}, kernel_size={conv.kernel_size}, "
            f"stride={conv.stride}, padding={conv.padding}")
    if conv.dilation != (1, 1):
        text += f", dilation={conv.dilation}"
    if conv.groups != 1:
        text += f", groups={conv.groups}"
    if conv.bias is None:
        text += ", bias=False"
    return text + ")"


def torchvision_recipe(
    backbone: nn.Module, arch: str, path: str | Path, *, image_size: int = 224
) -> str | None:
    """Python that loads ``backbone``'s export at ``path`` into ``torchvision.models`` with
    ``strict=True``, or ``None`` where torchvision has no such model (``small``, ``wrn28_2``,
    ``resnet50x2``, ``timm:``).

    The recipe is derived from the backbone itself and checked before it is returned: a fresh
    torchvision model with the same changes (classifier -> ``nn.Identity()``, a rebuilt first
    conv for 1-channel inputs, the CIFAR stem, BatchNorm -> GroupNorm for ``gn`` / ``in``)
    loads the backbone's state_dict with ``strict=True``.
    """
    if arch.startswith("torchvision:"):
        name = arch.removeprefix("torchvision:")
    elif arch in _TORCHVISION_NAMES:
        name = arch.removesuffix("_cifar")
    else:
        return None
    kwargs = torchvision_kwargs(name, image_size)
    try:
        reference = torchvision.models.get_model(name, weights=None, **kwargs)
    except Exception:  # not a torchvision model under this name and size
        return None
    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    lines = [f"m = torchvision.models.{name}({shown})"]
    modules = dict(backbone.named_modules())
    group_norms = [
        modules[p] for p, m in reference.named_modules() if isinstance(m, _BatchNorm)
        and isinstance(modules.get(p), nn.GroupNorm)
    ]
    if group_norms:
        kind = "in" if all(g.num_groups == g.num_channels for g in group_norms) else "gn"
        convert_norm(reference, kind)
        lines.insert(0, "from emanorm.norms import convert_norm")
        lines.append(f"convert_norm(m, {kind!r})")
    replaced: list[str] = []
    for sub, module in backbone.named_modules():
        if not sub or any(sub.startswith(r + ".") for r in replaced):
            continue
        try:
            theirs = reference.get_submodule(sub)
        except AttributeError:
            return None
        if isinstance(module, nn.Identity) and not isinstance(theirs, nn.Identity):
            reference.set_submodule(sub, nn.Identity())
            lines.append(f"{_attribute(sub)} = torch.nn.Identity()")
            replaced.append(sub)
        elif (
            isinstance(module, nn.Conv2d) and isinstance(theirs, nn.Conv2d)
            and _conv_config(module) != _conv_config(theirs)
        ):
            reference.set_submodule(sub, copy.deepcopy(module))  # the same layer; its weights get loaded
            lines.append(f"{_attribute(sub)} = {_conv_expression(module)}")
    try:
        reference.load_state_dict(dict(exported_tensors(backbone)), strict=True)
    except (RuntimeError, KeyError):
        return None
    lines.append(f"m.load_state_dict(torch.load('{path}', weights_only=True))")
    return "; ".join(lines)
