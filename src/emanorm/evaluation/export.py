"""Export a trained backbone as a plain state_dict for torchvision (``.pth``) or safetensors."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from emanorm.catalog import EXPORT_FORMATS

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


def exported_tensors(backbone: nn.Module) -> list[tuple[str, Tensor]]:
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
    return {key: value.detach().to("cpu").contiguous().clone() for key, value in exported_tensors(backbone)}


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
    try:
        if format == "torchvision":
            torch.save(state, tmp)
        else:
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata={str(k): str(v) for k, v in (metadata or {}).items()})
        tmp.replace(path)  # atomic: a crash never leaves a half-written export behind
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_exported(path: str | Path) -> dict[str, Tensor]:
    """Read a file written by :func:`export_backbone` (either format) back as a state_dict."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)
