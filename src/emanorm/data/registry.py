"""The dataset registry: names, static facts (``DatasetInfo``), splits, and the dataset classes.

Every dataset answers ``fetch(indices) -> uint8 (B, C, H, W)`` so the batch stream can move raw
bytes to the device and augment there. ``emanorm.data.datasets.load_dataset`` opens one; the file
readers are in :mod:`emanorm.data.formats`, image decoding and crops in :mod:`emanorm.data.images`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from emanorm.errors import UserError

DATASETS = ("fashion_mnist", "cifar10", "cifar100", "stl10", "imagenet", "folder", "voc2007")

# torchvision.datasets.folder.IMG_EXTENSIONS, so our file order is ImageFolder's order.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(UserError, ValueError):
    """Malformed data or a bad data argument; the message names the file or value."""


class DataNotFoundError(UserError, FileNotFoundError):
    """Data missing where it was looked for; the message names the places and the layout expected."""


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts a model and the augmentations need about a dataset."""

    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


_INFO = {
    "fashion_mnist": DatasetInfo("fashion_mnist", 10, 1, 28, (0.2860,), (0.3530,)),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": DatasetInfo("stl10", 10, 3, 96, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "imagenet": DatasetInfo("imagenet", 1000, 3, 224, IMAGENET_MEAN, IMAGENET_STD),
    "folder": DatasetInfo("folder", 0, 3, 224, IMAGENET_MEAN, IMAGENET_STD),
    # multi-label (emanorm.data.voc): targets are all -1, VOCDataset.label_matrix holds the labels
    "voc2007": DatasetInfo("voc2007", 20, 3, 224, IMAGENET_MEAN, IMAGENET_STD),
}

SPLITS = {
    "fashion_mnist": ("train", "test"),
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "stl10": ("train", "test", "unlabeled", "train+unlabeled"),
    "imagenet": ("train", "val"),
    "folder": ("train", "val", "test", "unlabeled"),
    "voc2007": ("train", "val", "trainval", "test"),
}
# Aliases accepted everywhere: "val" and "test" name the held-out split of every dataset.
_ALIASES = {"val": "test", "test": "val"}


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def dataset_info(name: str, *, image_size: int | None = None) -> DatasetInfo:
    """Static info of a dataset without loading it (``num_classes`` of file datasets is a default)."""
    _check_name(name)
    info = _INFO[name]
    if image_size is not None and image_size != info.image_size:
        if name not in ("imagenet", "folder", "voc2007"):
            raise DataError(f"{name} images are {info.image_size}px; image_size={image_size} is only for "
                            "imagenet, folder and voc2007")
        info = DatasetInfo(info.name, info.num_classes, info.channels, image_size, info.mean, info.std)
    return info


def pretrain_split(name: str) -> str:
    """The split a self-supervised run pre-trains on (STL-10 adds its 100k unlabeled images)."""
    _check_name(name)
    return "train+unlabeled" if name == "stl10" else "train"


def _resolve_split(name: str, split: str) -> str:
    allowed = SPLITS[name]
    if split in allowed:
        return split
    if _ALIASES.get(split) in allowed:
        return _ALIASES[split]
    raise DataError(f"unknown split {split!r} for {name}; choose one of {', '.join(allowed)}")


class ImageDataset:
    """A sized collection of images with integer targets (-1 where unknown)."""

    info: DatasetInfo
    targets: Tensor
    split: str
    in_memory: bool = True

    def __len__(self) -> int:
        return int(self.targets.numel())

    def fetch(self, indices: Sequence[int] | Tensor) -> Tensor:
        """uint8 images ``(B, C, H, W)`` at ``info.image_size`` for the given dataset indices."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.fetch([index])[0], int(self.targets[index])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.info.name!r}, split={self.split!r}, n={len(self)})"


class TensorImageDataset(ImageDataset):
    """Images held as one uint8 tensor ``(N, C, H, W)``: ``fetch`` is a tensor index."""

    def __init__(self, images: Tensor, targets: Tensor, info: DatasetInfo, split: str) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != info.channels:
            raise DataError(f"{info.name}: expected uint8 images (N, {info.channels}, H, W), "
                            f"got {images.dtype} {tuple(images.shape)}")
        if images.shape[0] != targets.numel():
            raise DataError(f"{info.name}: {images.shape[0]} images but {targets.numel()} targets")
        self.images = images
        self.targets = targets.long()
        self.info = info
        self.split = split

    def fetch(self, indices: Sequence[int] | Tensor) -> Tensor:
        return self.images[torch.as_tensor(indices, dtype=torch.long)]
