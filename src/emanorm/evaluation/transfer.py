"""Evaluating a run on another dataset: bring the target's images to the input the backbone was trained on.

A backbone is fed what it saw in training: the run's channel count, image size and normalisation
(``mean``/``std`` of the run's dataset, as ImageNet models keep ImageNet's statistics on VOC).
Channels are converted (RGB -> grey by ITU-R 601-2 luma, grey -> RGB by replication) and the
image is resized (shorter side, antialiased) and centre-cropped to the run's size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L") and torchvision


class ChannelAdapter(nn.Module):
    """``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)`` for 1 <-> 3 channels.

    3 -> 1 returns float in [0, 1] (uint8 input is scaled), which the augmentation presets accept;
    1 -> 3 keeps the dtype.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        if (in_channels, out_channels) not in ((3, 1), (1, 3), (1, 1), (3, 3)):
            raise ValueError(
                f"cannot convert {in_channels}-channel images to {out_channels} channels; "
                "supported: 3 -> 1 (luma), 1 -> 3 (replicate)"
            )
        self.in_channels, self.out_channels = in_channels, out_channels

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}"

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, {self.in_channels}, H, W) images, got {tuple(x.shape)}")
        if self.in_channels == 3 and self.out_channels == 1:
            # In float, not torchvision's uint8 path (which truncates): grey stored as RGB comes back exact.
            x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
            weights = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            return (x * weights).sum(dim=1, keepdim=True)
        if self.in_channels == 1 and self.out_channels == 3:
            return x.expand(-1, 3, -1, -1).contiguous()
        return x


def describe_adaptation(target: Any, model: Any) -> dict[str, Any] | None:
    """What must change to feed ``target``'s images (a DatasetInfo) to a model trained on ``model``'s.

    ``None`` when nothing changes; else a record of the channels, size and normalisation used.
    """
    changes = {}
    if target.channels != model.channels:
        how = "ITU-R 601-2 luma" if target.channels == 3 else "replicated"
        changes["channels"] = f"{target.channels} -> {model.channels} ({how})"
    if target.image_size != model.image_size:
        changes["image_size"] = f"{target.image_size} -> {model.image_size} (resize, centre crop)"
    if tuple(target.mean) != tuple(model.mean) or tuple(target.std) != tuple(model.std):
        changes["normalisation"] = f"mean/std of the run's dataset ({getattr(model, 'name', '?')})"
    return changes or None


def adapted_transform(target: Any, model: Any, transform: nn.Module) -> nn.Module:
    """``transform`` (built for ``model``'s info) preceded by a channel conversion when needed."""
    if target.channels == model.channels:
        return transform
    return nn.Sequential(ChannelAdapter(target.channels, model.channels), transform)
