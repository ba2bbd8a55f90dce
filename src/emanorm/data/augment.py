"""Batched augmentation presets with fresh randomness per sample, on whatever device the batch lives.

torchvision's v2 transforms draw one set of parameters per call, so applied to a batch every image
gets the same crop. Here each op draws its parameters per sample (on the CPU, from an optional
``torch.Generator``, so a seed gives the same draws on CPU and CUDA), then applies them vectorised:
crops and flips as one ``grid_sample`` or one gather, colour jitter with per-sample factors, blur
as a grouped convolution, and RandAugment by grouping the samples that drew the same op and sign
and calling ``torchvision.transforms.v2.functional`` on each group. docs/data.md lists every preset.
The ops live in :mod:`emanorm.data.augment_ops`; the presets that combine them are here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from emanorm.data.augment_ops import (
    ColorJitter,
    CropDraws,
    Cutout,
    GaussianBlur,
    Generator,
    RandAugment,
    RandomGrayscale,
    RandomResizedCropFlip,
    RandomSolarize,
    RandomTranslateFlip,
    _Op,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    fallback_box,
)
from emanorm.data.images import resize_center_crop
from emanorm.data.registry import DataError, DatasetInfo

AUGMENTATIONS = (
    "none", "weak", "strong", "moco", "byol1", "byol2", "dino_global1", "dino_global2", "dino_local",
)
#: DINO's multi-crop defaults (main_dino.py of facebookresearch/dino): global and local crop scales,
#: and the local crop side as a fraction of the global one (96 of 224 px).
DINO_GLOBAL_SCALE = (0.4, 1.0)
DINO_LOCAL_SCALE = (0.05, 0.4)
DINO_LOCAL_FRACTION = 96 / 224

__all__ = [
    "AUGMENTATIONS", "DINO_GLOBAL_SCALE", "DINO_LOCAL_FRACTION", "DINO_LOCAL_SCALE", "BatchAugment",
    "ColorJitter", "CropDraws", "Cutout", "GaussianBlur", "Generator", "RandAugment", "RandomGrayscale",
    "RandomResizedCropFlip", "RandomSolarize", "RandomTranslateFlip", "adjust_brightness", "adjust_contrast",
    "adjust_hue", "adjust_saturation", "blur_kernel_size", "build_augmentation", "dino_local_size",
    "fallback_box",
]


class BatchAugment(nn.Module):
    """A preset: uint8 or float ``(B, C, H, W)`` on any device -> normalised float32, per-sample random.

    ``forward(x, generator=None)``: ``generator`` is an optional CPU ``torch.Generator`` for every
    random draw (the default generator otherwise), so a seed reproduces the batch on any device.
    Float inputs are taken to be in [0, 1]. Inputs not at ``info.image_size`` are first resized
    (shorter side) and centre-cropped.
    """

    def __init__(self, preset: str, info: DatasetInfo, ops: list[_Op]) -> None:
        super().__init__()
        self.preset, self.info, self.ops = preset, info, list(ops)
        self._stats: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def extra_repr(self) -> str:
        return f"preset={self.preset!r}, size={self.info.image_size}, ops=[{', '.join(map(repr, self.ops))}]"

    @property
    def crop(self) -> RandomResizedCropFlip | None:
        """The preset's RandomResizedCrop + flip when it is its first op (file datasets apply it to
        the whole image while decoding, see ``without_crop``), else None."""
        return self.ops[0] if self.ops and isinstance(self.ops[0], RandomResizedCropFlip) else None

    def without_crop(self) -> BatchAugment:
        """This preset minus its leading crop + flip: what is left to run on the device once
        ``FileImageDataset.fetch_views`` has cropped, resized and flipped each view."""
        return BatchAugment(self.preset, self.info, self.ops[1:] if self.crop is not None else self.ops)

    def _mean_std(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._stats:
            self._stats[device] = (torch.tensor(self.info.mean, device=device).view(1, -1, 1, 1),
                                   torch.tensor(self.info.std, device=device).view(1, -1, 1, 1))
        return self._stats[device]

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.info.channels:
            raise DataError(f"augmentation {self.preset!r} for {self.info.name} expects "
                            f"(B, {self.info.channels}, H, W), got {tuple(x.shape)}")
        if generator is not None and generator.device.type != "cpu":
            raise DataError(f"augmentation generator must be a CPU torch.Generator, not {generator.device}")
        x = x.to(torch.float32).div_(255) if x.dtype == torch.uint8 else x.to(torch.float32)
        size = self.info.image_size
        if tuple(x.shape[-2:]) != (size, size):
            x = resize_center_crop(x, size)
        if x.shape[0]:
            for op in self.ops:
                x = op(x, generator)
        mean, std = self._mean_std(x.device)
        # in place on the fresh difference: the same values, one large allocation fewer
        return (x - mean).div_(std).contiguous()


def blur_kernel_size(image_size: int) -> int:
    """About 10% of the image side, odd (23 at 224 px, as SimCLR/BYOL; 9 at 96; 3 at 28/32)."""
    k = max(3, int(0.1 * image_size))
    return k if k % 2 else k + 1


def dino_local_size(image_size: int) -> int:
    """DINO's local crop side for a global side ``image_size``: 96 at 224, 12 at 28, 14 at 32."""
    return max(1, round(image_size * DINO_LOCAL_FRACTION))


def _scale_option(name: str, value: object) -> tuple[float, float]:
    """A crop scale range ``[low, high]`` with ``0 < low <= high <= 1``, or a one-line DataError."""
    ok = (isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
    if not ok or not 0 < value[0] <= value[1] <= 1:  # type: ignore[index]
        raise DataError(f"{name}={value!r} must be [low, high] with 0 < low <= high <= 1")
    return float(value[0]), float(value[1])  # type: ignore[index]


def build_augmentation(preset: str, info: DatasetInfo, *, blur: bool | None = None,
                       cutout: float | None = None, global_scale: object = DINO_GLOBAL_SCALE,
                       local_scale: object = DINO_LOCAL_SCALE, local_size: int | None = None,
                       crop_scale: object = None) -> BatchAugment:
    """The named preset (one of ``AUGMENTATIONS``) for a dataset's size and channels.

    ``blur`` overrides whether MoCo/BYOL/DINO presets blur (default: only above 32 px, as the CIFAR
    recipes of MoCo's demo and SimCLR drop it); ``cutout`` overrides the side fraction of the
    ``strong`` preset's Cutout (default 0.5 up to 96 px, none at larger sizes; 0 turns it off).
    ``global_scale`` / ``local_scale`` are the RandomResizedCrop scale ranges of DINO's global
    (``dino_global1``/``2``) and local (``dino_local``) views, ``local_size`` the local views' side
    (default :func:`dino_local_size`; global views keep the dataset's size). ``crop_scale``
    replaces the RandomResizedCrop scale range of ``moco``, ``byol1`` and ``byol2`` (MoCo v3's
    ``--crop-min``; default: 0.2-1 for ``moco``, 0.08-1 for the BYOL pair).
    """
    if preset not in AUGMENTATIONS:
        raise DataError(f"unknown augmentation {preset!r}; choose one of {', '.join(AUGMENTATIONS)}")
    size, channels = info.image_size, info.channels
    global_scale = _scale_option("global_scale", global_scale)
    local_scale = _scale_option("local_scale", local_scale)
    ssl_scale = None if crop_scale is None else _scale_option("crop_scale", crop_scale)
    if local_size is None:
        local_size = dino_local_size(size)
    elif isinstance(local_size, bool) or not isinstance(local_size, int) or local_size < 1:
        raise DataError(f"local_size={local_size!r} must be a positive integer (pixels)")
    large = size >= 128
    blur = size > 32 if blur is None else blur
    cutout = (0.5 if size <= 96 else 0.0) if cutout is None else cutout
    if not 0.0 <= cutout <= 1.0:
        raise DataError(f"cutout={cutout} must be in [0, 1]")
    # FixMatch's weak view: RandomResizedCrop + flip at ImageNet scale (the paper), translate 12.5% below.
    weak: list[_Op] = ([RandomResizedCropFlip(size, (0.08, 1.0))] if large
                       else [RandomTranslateFlip(round(0.125 * size))])

    def ssl(scale: tuple[float, float], saturation: float, blur_p: float, solarize_p: float,
            out_size: int = size) -> list[_Op]:
        ops: list[_Op] = [RandomResizedCropFlip(out_size, scale),
                          ColorJitter(0.4, 0.4, saturation, 0.1, p=0.8, channels=channels)]
        if channels == 3:
            ops.append(RandomGrayscale(0.2))
        if blur and blur_p > 0:
            ops.append(GaussianBlur(blur_kernel_size(out_size), (0.1, 2.0), p=blur_p))
        if solarize_p > 0:
            ops.append(RandomSolarize(solarize_p))
        return ops

    ops: list[_Op]
    if preset == "none":
        ops = []
    elif preset == "weak":
        ops = weak
    elif preset == "strong":
        ops = [*weak, RandAugment(2, 10)] + ([Cutout(cutout)] if cutout > 0 else [])
    elif preset == "moco":
        ops = ssl(ssl_scale or (0.2, 1.0), 0.4, 0.5, 0.0)
    elif preset == "byol1":
        ops = ssl(ssl_scale or (0.08, 1.0), 0.2, 1.0, 0.0)
    elif preset == "byol2":
        ops = ssl(ssl_scale or (0.08, 1.0), 0.2, 0.1, 0.2)
    # DINO's DataAugmentationDINO: BYOL's photometric pair on the two global crops, and on every
    # local crop the same jitter and grey with a blur of probability 0.5 (no solarization).
    elif preset == "dino_global1":
        ops = ssl(global_scale, 0.2, 1.0, 0.0)
    elif preset == "dino_global2":
        ops = ssl(global_scale, 0.2, 0.1, 0.2)
    else:  # dino_local
        ops = ssl(local_scale, 0.2, 0.5, 0.0, out_size=local_size)
    return BatchAugment(preset, info, ops)
