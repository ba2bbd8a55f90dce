"""Export a trained backbone as a plain state_dict for torchvision (``.pth``) or safetensors."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from emanorm.models.backbones import torchvision_kwargs
from emanorm.norms import convert_norm

EXPORT_FORMATS = ("torchvision", "safetensors")
# emanorm backbone names that are torchvision models (the _cifar ones with a 3x3 stem, no max-pool)
_TORCHVISION_NAMES = (
    "resnet18", "resnet34", "resnet50", "resnet18_cifar", "resnet34_cifar", "resnet50_cifar",
)
# Wrappers that prefix every key: DistributedDataParallel ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _exported_items(backbone: nn.Module) -> list[tuple[str, Tensor]]:
    """``(key, tensor)`` of what an export holds: the classifier ``fc`` left out, wrapper prefixes off."""
    skip = "fc." if isinstance(getattr(backbone, "fc", None), nn.Linear) else None
    return [
        (_strip_wrappers(key), value)
        for key, value in backbone.state_dict().items()
        if skip is None or not key.startswith(skip)
    ]


def backbone_state_dict(backbone: nn.Module) -> dict[str, Tensor]:
    """The backbone's weights and buffers as contiguous CPU tensors, classifier excluded.

    The classifier is ``fc`` when it is an ``nn.Linear`` (a torchvision classifier); a backbone whose
    ``fc`` is ``nn.Identity`` (the emanorm convention) has no such keys. DDP/compile prefixes are
    stripped so the keys match the bare torchvision model.
    """
    # clone: safetensors refuses tensors sharing storage, and the file must not alias live weights
    return {key: value.detach().to("cpu").contiguous().clone() for key, value in _exported_items(backbone)}


def export_backbone(
    backbone: nn.Module,
    path: str | Path,
    format: str = "torchvision",
    *,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``backbone``'s state_dict (classifier excluded) to ``path`` and return the path.

    ``torchvision``: ``torch.save`` of a plain ``dict[str, Tensor]``, loadable with
    ``torch.load(path, weights_only=True)`` and ``strict=True`` into the matching
    ``torchvision.models.resnetXX()`` whose ``fc`` is ``nn.Identity()``.
    ``safetensors``: the same tensors in a ``.safetensors`` file (``metadata`` stored as strings).
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; allowed: {', '.join(EXPORT_FORMATS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = backbone_state_dict(backbone)
    tmp = path.with_name(path.name + ".tmp")
    if format == "torchvision":
        torch.save(state, tmp)
    else:
        from safetensors.torch import save_file

        save_file(state, str(tmp), metadata={str(k): str(v) for k, v in (metadata or {}).items()})
    tmp.replace(path)  # atomic: a crash never leaves a half-written export behind
    return path


def load_exported(path: str | Path) -> dict[str, Tensor]:
    """Read a file written by :func:`export_backbone` (either format) back as a state_dict."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


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
        reference.load_state_dict(dict(_exported_items(backbone)), strict=True)
    except (RuntimeError, KeyError):
        return None
    lines.append(f"m.load_state_dict(torch.load('{path}', weights_only=True))")
    return "; ".join(lines)
