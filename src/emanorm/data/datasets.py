"""Datasets as uint8 image batches: ``load_dataset`` opens one split of one of ``DATASETS``.

Small sets live in memory, ImageFolder trees decode from files. The parts live by job:
:mod:`emanorm.data.registry` (names, ``DatasetInfo``, splits, the dataset classes),
:mod:`emanorm.data.images` (decoding and crop geometry, ``FileImageDataset``) and
:mod:`emanorm.data.formats` (IDX, CIFAR, STL-10, ImageFolder, the Fashion-MNIST download policy).
Their public names are importable from here too, as before the split. See docs/data.md.
"""

from __future__ import annotations

from pathlib import Path

from emanorm.catalog import DATA_DIR_LAYOUTS
from emanorm.data.formats import (
    _CIFAR,
    _FOLDER_LAYOUT,
    DEFAULT_CACHE_DIR,
    FASHION_MNIST_SYSTEM_DIR,
    _load_cifar,
    _load_fashion_mnist,
    _load_folder,
    _load_stl10,
    read_idx,
    scan_image_folder,
)
from emanorm.data.images import (
    DEFAULT_EVAL_CROP_FRACTION,
    DEFAULT_MAX_IMAGE_PIXELS,
    Box,
    EncodedViews,
    FileImageDataset,
    ViewBoxes,
    centre_box,
    crop_resize,
    decode_image_file,
    decode_views,
    open_image_file,
    resize_center_crop,
)
from emanorm.data.registry import (
    _INFO,
    DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMG_EXTENSIONS,
    SPLITS,
    DataError,
    DataNotFoundError,
    DatasetInfo,
    ImageDataset,
    TensorImageDataset,
    _check_name,
    _resolve_split,
    dataset_info,
    pretrain_split,
)

__all__ = [
    "DATASETS",
    "DEFAULT_CACHE_DIR",
    "DEFAULT_EVAL_CROP_FRACTION",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "FASHION_MNIST_SYSTEM_DIR",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "SPLITS",
    "_INFO",
    "Box",
    "DataError",
    "DataNotFoundError",
    "DatasetInfo",
    "EncodedViews",
    "FileImageDataset",
    "ImageDataset",
    "TensorImageDataset",
    "ViewBoxes",
    "centre_box",
    "crop_resize",
    "dataset_info",
    "decode_image_file",
    "decode_views",
    "load_dataset",
    "open_image_file",
    "pretrain_split",
    "read_idx",
    "resize_center_crop",
    "scan_image_folder",
]


def load_dataset(name: str, split: str, data_dir: str | Path | None = None, *,
                 image_size: int | None = None, crop_fraction: float = DEFAULT_EVAL_CROP_FRACTION,
                 on_corrupt: str = "error", download: bool = True,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> ImageDataset:
    """Load split ``split`` of dataset ``name`` (one of ``DATASETS``); see docs/data.md for layouts.

    ``image_size``, ``crop_fraction`` (the evaluation view: resize the shorter side to
    ``image_size / crop_fraction`` before the centre crop; 0.875 gives 256 -> 224), ``on_corrupt``
    and ``max_image_pixels`` (files above it are refused before decoding) apply to file datasets
    (imagenet, folder, voc2007); ``download`` lets Fashion-MNIST fall back to a torchvision download
    when no local copy is found.
    """
    _check_name(name)
    split = _resolve_split(name, split)
    if image_size is not None:
        dataset_info(name, image_size=image_size)  # validates
    if data_dir is not None and not str(data_dir).strip():
        # Path("") is the working directory: an empty --data-dir (an unset shell variable) would
        # silently read whatever is there
        raise DataNotFoundError(f"{name}: data_dir is an empty string; give a directory or leave it out")
    root = Path(data_dir).expanduser() if data_dir is not None else None
    if name == "fashion_mnist":
        return _load_fashion_mnist(root, split, download)
    if root is None:
        layout = DATA_DIR_LAYOUTS.get(name, _FOLDER_LAYOUT)
        raise DataNotFoundError(f"{name} needs data_dir; expected {layout}")
    if not root.is_dir():
        what = "is not a directory" + ("" if root.exists() else " (it does not exist)")
        raise DataNotFoundError(f"{name}: data_dir {root} {what}")
    if name in _CIFAR:
        return _load_cifar(name, root, split)
    if name == "stl10":
        return _load_stl10(root, split)
    if name == "voc2007":
        from emanorm.data.voc import load_voc2007

        return load_voc2007(root, split, image_size=image_size, crop_fraction=crop_fraction,
                            on_corrupt=on_corrupt)
    return _load_folder(name, root, split, image_size, crop_fraction, on_corrupt, max_image_pixels)
