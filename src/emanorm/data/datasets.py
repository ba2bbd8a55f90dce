"""Datasets as uint8 image batches: small sets live in memory, ImageFolder trees decode from files.

Every dataset answers ``fetch(indices) -> uint8 (B, C, H, W)`` so the batch stream can move raw
bytes to the device and augment there. Readers are written against the published on-disk layouts
(IDX, CIFAR python pickles, STL-10 binary, ImageFolder); see docs/data.md.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import struct
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from emanorm.data.safe_pickle import ADMITTED, RefusedGlobal, load_data_pickle
from emanorm.errors import UserError

DATASETS = ("fashion_mnist", "cifar10", "cifar100", "stl10", "imagenet", "folder", "voc2007")

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_CACHE_DIR = Path(os.environ.get("EMANORM_DATA_CACHE",
                                        Path.home() / ".cache" / "emanorm" / "datasets"))
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


# ---------------------------------------------------------------------------------------------
# Image files

# Pillow's own default limit (``PIL.Image.MAX_IMAGE_PIXELS``, about 89.5M pixels, 9459 x 9459): a larger
# file is refused from its header, before anything is decoded (a decompression bomb is a tiny file that
# decodes to gigabytes), with the file named. ``max_image_pixels=None`` turns the check off.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# The standard evaluation view: the shorter side resized to image_size / 0.875 (256 for 224), then a
# centre crop of image_size.
DEFAULT_EVAL_CROP_FRACTION = 0.875
# The DCT scalings libjpeg can decode at, through Pillow's Image.draft (largest first).
_JPEG_REDUCTIONS = (8, 4, 2)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

Box = tuple[int, int, int, int]
"""A crop box ``(top, left, height, width)`` in pixels of the full-size image."""


class ViewBoxes(Protocol):
    """The crop boxes of one training view for a batch, known per sample once the image's size is
    (``emanorm.data.augment.CropDraws``: RandomResizedCrop's distribution)."""

    def box(self, row: int, height: int, width: int) -> Box: ...

    def flipped(self, row: int) -> bool: ...


def open_image_file(path: str | Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, *,
                    data: bytes | bytearray | None = None) -> Image.Image:
    """Open an image lazily (its header only; from ``data`` if given, the file's bytes); refuse it
    above ``max_pixels`` before it is decoded. Errors are DataErrors naming ``path``."""
    path = str(path)
    if max_pixels is None or max_pixels > (Image.MAX_IMAGE_PIXELS or math.inf):
        # Pillow itself refuses at twice its own limit; a limit raised here must be the one that rules.
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked just below
            im = Image.open(path if data is None else io.BytesIO(data))
    except Image.DecompressionBombError:  # Pillow's own refusal (2x its limit): say it our way
        try:
            im = _open_unchecked(path if data is None else io.BytesIO(data))
        except Exception as err:
            raise DataError(f"cannot decode image file {path}: {err}") from err
    except Exception as err:
        raise DataError(f"cannot decode image file {path}: {err}") from err
    width, height = im.size
    if max_pixels is not None and width * height > max_pixels:
        im.close()
        raise DataError(f"image file {path} is {width}x{height} = {width * height} pixels, above the limit "
                        f"max_image_pixels={max_pixels} (a decompression bomb?); raise the limit to read it")
    return im


def _open_unchecked(source: str | io.BytesIO) -> Image.Image:
    """Open a file Pillow refused as a decompression bomb, only to read the size it claims."""
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        return Image.open(source)
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _read_bytes(path: str) -> bytearray:
    try:
        with open(path, "rb") as f:
            return bytearray(f.read())
    except OSError as err:
        raise DataError(f"cannot read image file {path}: {err}") from err


def _pixels(im: Image.Image, channels: int) -> Tensor:
    """Decode an opened image to uint8 ``(C, H, W)`` (channels-last in memory), whatever its mode:
    palette, CMYK, grey+alpha... through Pillow's conversions; 16-bit greys scaled to 8 bits (Pillow's
    convert would clip them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "palette images with transparency expressed in bytes"
        if im.mode in _SIXTEEN_BIT_MODES:
            grey = (np.clip(np.asarray(im), 0, 65535).astype(np.uint16) >> 8).astype(np.uint8)
            arr = np.repeat(grey[:, :, None], channels, axis=2)
        else:
            target = "RGB" if channels == 3 else "L"
            arr = np.array(im if im.mode == target else im.convert(target))
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr).permute(2, 0, 1)


def _decode(path: str, im: Image.Image, channels: int, reduction: int = 1,
            data: bytearray | None = None) -> tuple[Tensor, float]:
    """Decode ``im``, at 1/``reduction`` of its size where the file allows (JPEG: libjpeg's DCT
    scaling through Pillow's ``Image.draft``); returns the pixels and the factor that takes full-size
    coordinates to decoded ones. A plain RGB or grey JPEG at full size whose bytes are given goes to
    ``torchvision.io.decode_jpeg`` (libjpeg-turbo too, without Pillow's copies: about 25% faster)."""
    scale = 1.0
    try:
        if im.format == "JPEG" and reduction > 1:
            width, height = im.size
            drafted = im.draft(None, (width // reduction, height // reduction))
            if drafted is not None:
                scale = drafted[1][2] / width
        elif im.format == "JPEG" and data is not None and im.mode in ("RGB", "L"):
            mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torchvision 0.29 deprecates its decoders for torchcodec
                return decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=mode), scale
        return _pixels(im, channels), scale
    except Exception as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"cannot decode image file {path}: {message}") from err


def decode_image_file(path: str | Path, channels: int = 3,
                      max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Tensor:
    """Decode one image file at full size to uint8 ``(C, H, W)``; a DataError names the file if it is
    unreadable or above ``max_pixels``. Pillow decodes every ImageFolder format (JPEG through
    libjpeg-turbo, PNG, BMP, PPM/PGM, TIFF, WebP, GIF) and mode (CMYK, palette, 16-bit, alpha)."""
    with open_image_file(path, max_pixels) as im:
        return _decode(str(path), im, channels)[0].contiguous()


def _jpeg_reduction(smallest_side: float, size: int) -> int:
    """The largest DCT reduction after which a crop of ``smallest_side`` pixels still has ``size``."""
    return next((r for r in _JPEG_REDUCTIONS if smallest_side >= r * size), 1)


def _scaled_box(box: Box, scale: float, height: int, width: int) -> Box:
    """``box`` in coordinates of the image decoded at ``scale`` (its size ``height`` x ``width``)."""
    top, left, h, w = box
    if scale == 1.0:
        return box
    y0, x0 = min(round(top * scale), height - 1), min(round(left * scale), width - 1)
    y1 = max(min(round((top + h) * scale), height), y0 + 1)
    x1 = max(min(round((left + w) * scale), width), x0 + 1)
    return y0, x0, y1 - y0, x1 - x0


def centre_box(height: int, width: int) -> Box:
    """The centred square of side ``min(height, width)`` (a view without a random crop)."""
    side = min(height, width)
    return round((height - side) / 2), round((width - side) / 2), side, side


def crop_resize(img: Tensor, box: Box, size: int, flip: bool = False) -> Tensor:
    """Crop ``box`` out of a ``(C, H, W)`` image at its own resolution, resize the crop to ``size`` x
    ``size`` (bilinear, antialiased: RandomResizedCrop's defaults) and flip it horizontally if asked."""
    out = TF.resized_crop(img, *box, [size, size], antialias=True)
    return TF.horizontal_flip(out) if flip else out


def resize_center_crop(img: Tensor, size: int, crop_fraction: float = 1.0) -> Tensor:
    """Resize the shorter side to ``size / crop_fraction`` (antialiased), then centre-crop ``size``."""
    short = round(size / crop_fraction)
    if min(img.shape[-2:]) != short:
        img = TF.resize(img, [short], antialias=True)
    if tuple(img.shape[-2:]) != (size, size):
        img = TF.center_crop(img, [size, size])
    return img


@dataclass
class EncodedViews:
    """Training views of a batch read from disk but not decoded yet (``FileImageDataset.read_views``):
    JPEG bytes and boxes for a device's decoder, and the views of other files already decoded."""

    paths: list[str]
    jpeg: list[Tensor | None]  # per sample: the file's bytes, or None where the CPU decoded it
    boxes: list[list[tuple[Box, bool]]]  # per sample, per view: full-size box and flip ([] if decoded)
    decoded: list[list[Tensor] | None]  # per sample, per view: uint8 views decoded on the CPU
    num_views: int
    size: int


def _decode_jpegs(data: list[Tensor], paths: list[str], device: torch.device) -> list[Tensor]:
    if not data:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 deprecates its decoders for torchcodec
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            for one, path in zip(data, paths, strict=True):  # find the file to name
                try:
                    decode_jpeg(one, mode=ImageReadMode.RGB, device=device)
                except RuntimeError as err:
                    raise DataError(f"cannot decode image file {path}: {str(err).splitlines()[0]}") from err
            raise


def decode_views(batch: EncodedViews, device: str | torch.device) -> list[Tensor]:
    """Decode an ``EncodedViews`` batch on ``device`` (nvJPEG on CUDA, in one batched call), then crop,
    resize and flip every view there: one uint8 ``(B, C, size, size)`` tensor per view."""
    device = torch.device(device)
    rows = [r for r, data in enumerate(batch.jpeg) if data is not None]
    images = dict(zip(rows, _decode_jpegs([batch.jpeg[r] for r in rows], [batch.paths[r] for r in rows],
                                          device), strict=True))
    views = []
    for v in range(batch.num_views):
        per_sample = []
        for r in range(len(batch.paths)):
            if r in images:
                box, flip = batch.boxes[r][v]
                per_sample.append(crop_resize(images[r], box, batch.size, flip))
            else:
                per_sample.append(batch.decoded[r][v].to(device, non_blocking=True))
        views.append(torch.stack(per_sample) if per_sample else
                     torch.empty((0, 3, batch.size, batch.size), dtype=torch.uint8, device=device))
    return views


class FileImageDataset(ImageDataset):
    """Images decoded from files when fetched; nothing but the paths is held in memory.

    * ``fetch(indices)``: the evaluation view (kNN, linear, fine-tune, the monitor, test accuracy):
      the shorter side resized to ``image_size / crop_fraction`` (default 0.875: 256 for 224),
      antialiased, then a centre crop of ``image_size``.
    * ``fetch_views(indices, views)``: training views, one decode for all views of an image; each
      view's box is drawn from the whole image (``ViewBoxes``, RandomResizedCrop's distribution),
      cropped at the source resolution, resized to ``image_size`` (antialiased), then flipped. A
      view given as None is the centred square of the shorter side. A JPEG whose every box is at least
      twice ``image_size`` is decoded at 1/2, 1/4 or 1/8 of its size (DCT scaling), which is faster.
    * ``read_views`` + ``decode_views``: the same with the JPEG decoding on a CUDA device (nvJPEG);
      ``BatchStream`` uses them on CUDA while ``gpu_decode`` is true.

    ``on_corrupt="error"`` (default): an unreadable file raises a DataError naming it when it is
    fetched. ``"skip"``: every file is decoded once here and unreadable ones are dropped with a
    warning naming them (costs a full decoding pass; meant for small folders). Files above
    ``max_image_pixels`` are refused from their header, naming them (None: no limit).
    """

    in_memory = False
    gpu_decode = True

    def __init__(self, paths: Sequence[str], targets: Tensor, info: DatasetInfo, split: str, *,
                 classes: Sequence[str] = (), root: str | Path = "",
                 crop_fraction: float = DEFAULT_EVAL_CROP_FRACTION, on_corrupt: str = "error",
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        if on_corrupt not in ("error", "skip"):
            raise DataError(f"on_corrupt={on_corrupt!r}; choose 'error' or 'skip'")
        if not 0.0 < crop_fraction <= 1.0:
            raise DataError(f"crop_fraction={crop_fraction} must be in (0, 1]")
        if max_image_pixels is not None and (isinstance(max_image_pixels, bool) or
                                             not isinstance(max_image_pixels, int) or max_image_pixels < 1):
            raise DataError(f"max_image_pixels={max_image_pixels!r} must be a positive integer or None")
        paths = [str(p) for p in paths]
        targets = torch.as_tensor(targets, dtype=torch.long)
        self.max_image_pixels = max_image_pixels
        if on_corrupt == "skip":
            good = [i for i, p in enumerate(paths) if _readable(p, info.channels, max_image_pixels)]
            if len(good) < len(paths):
                bad = sorted(set(range(len(paths))) - set(good))
                warnings.warn(f"skipping {len(bad)} unreadable image(s): " + ", ".join(paths[i] for i in bad),
                              stacklevel=2)
            paths = [paths[i] for i in good]
            targets = targets[torch.as_tensor(good, dtype=torch.long)]
        self.paths = paths
        self.targets = targets
        self.info = info
        self.split = split
        self.classes = list(classes)
        self.root = str(root)
        self.crop_fraction = crop_fraction

    def _open(self, index: int) -> tuple[Image.Image, bytearray]:
        data = _read_bytes(self.paths[index])
        return open_image_file(self.paths[index], self.max_image_pixels, data=data), data

    def load(self, index: int) -> Tensor:
        """The evaluation view of image ``index``: uint8 ``(C, image_size, image_size)``."""
        size, path = self.info.image_size, self.paths[index]
        short = round(size / self.crop_fraction)
        im, data = self._open(index)
        with im:
            img, _ = _decode(path, im, self.info.channels, _jpeg_reduction(min(im.size), short), data)
        return resize_center_crop(img, size, self.crop_fraction)

    def fetch(self, indices: Sequence[int] | Tensor) -> Tensor:
        idx = torch.as_tensor(indices, dtype=torch.long).tolist()
        if not idx:
            s = self.info.image_size
            return torch.empty((0, self.info.channels, s, s), dtype=torch.uint8)
        return torch.stack([self.load(i) for i in idx])

    @staticmethod
    def view_boxes(height: int, width: int, views: Sequence[ViewBoxes | None], row: int
                   ) -> list[tuple[Box, bool]]:
        """Full-size (box, flip) of each view of the image at ``row`` of the batch."""
        return [(centre_box(height, width), False) if v is None
                else (v.box(row, height, width), v.flipped(row)) for v in views]

    def _views(self, index: int, im: Image.Image, data: bytearray, boxes: list[tuple[Box, bool]]
               ) -> list[Tensor]:
        size = self.info.image_size
        reduction = _jpeg_reduction(min(min(b[2], b[3]) for b, _ in boxes), size)
        img, scale = _decode(self.paths[index], im, self.info.channels, reduction, data)
        height, width = img.shape[1:]
        return [crop_resize(img, _scaled_box(b, scale, height, width), size, flip) for b, flip in boxes]

    def load_views(self, index: int, views: Sequence[ViewBoxes | None], row: int = 0) -> list[Tensor]:
        """The training views of image ``index`` (at ``row`` of its batch): uint8 ``(C, S, S)`` each."""
        im, data = self._open(index)
        with im:
            width, height = im.size
            return self._views(index, im, data, self.view_boxes(height, width, views, row))

    def fetch_views(self, indices: Sequence[int] | Tensor, views: Sequence[ViewBoxes | None]) -> list[Tensor]:
        """One uint8 ``(B, C, S, S)`` batch per view of the images ``indices`` (see the class notes)."""
        idx = torch.as_tensor(indices, dtype=torch.long).tolist()
        if not idx:
            s = self.info.image_size
            return [torch.empty((0, self.info.channels, s, s), dtype=torch.uint8) for _ in views]
        samples = [self.load_views(i, views, row) for row, i in enumerate(idx)]
        return [torch.stack([s[v] for s in samples]) for v in range(len(views))]

    def read_views(self, indices: Sequence[int] | Tensor, views: Sequence[ViewBoxes | None]) -> EncodedViews:
        """What ``fetch_views`` does, short of decoding: RGB JPEGs are only read (for ``decode_views``
        on a device); other files (PNG, CMYK or grey JPEG, ...) are decoded here. The pixel limit and
        the boxes come from the headers, so the boxes are the ones ``fetch_views`` would use."""
        idx = torch.as_tensor(indices, dtype=torch.long).tolist()
        batch = EncodedViews([self.paths[i] for i in idx], [], [], [], len(views), self.info.image_size)
        for row, i in enumerate(idx):
            im, data = self._open(i)
            with im:
                width, height = im.size
                boxes = self.view_boxes(height, width, views, row)
                if im.format == "JPEG" and im.mode == "RGB" and self.info.channels == 3:
                    batch.jpeg.append(torch.frombuffer(data, dtype=torch.uint8))
                    batch.boxes.append(boxes)
                    batch.decoded.append(None)
                else:
                    batch.jpeg.append(None)
                    batch.boxes.append([])
                    batch.decoded.append(self._views(i, im, data, boxes))
        return batch


def _readable(path: str, channels: int, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> bool:
    try:
        decode_image_file(path, channels, max_pixels)
        return True
    except DataError:
        return False


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX)


_FASHION_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                  "t10k-labels-idx1-ubyte")
_READ_CHUNK = 1 << 24


def _read_idx_stream(f: BinaryIO, path: Path) -> np.ndarray:
    header = f.read(4)
    if len(header) < 4 or header[0] != 0 or header[1] != 0 or header[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = header[3]
    dims_bytes = f.read(4 * ndim)
    if len(dims_bytes) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX header ({4 + len(dims_bytes)} bytes for {ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", dims_bytes)
    expected = math.prod(dims)
    # Read in chunks up to one byte past what the header promises: memory follows the data actually
    # there (a header may claim terabytes), and the extra read makes gzip check its end marker and CRC.
    data = bytearray()
    while len(data) <= expected:
        chunk = f.read(min(_READ_CHUNK, expected + 1 - len(data)))
        if not chunk:
            break
        data += chunk
    got = len(data)
    if got > expected:
        f.read(_READ_CHUNK)  # a corrupt .gz often inflates to extra bytes: let gzip check its CRC first
    if got != expected:
        holds = str(got) if got < expected else "more"
        raise DataError(f"{path}: IDX header says {dims} ({expected} values) but holds {holds}")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes into an array of its shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return _read_idx_stream(f, path)
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise DataError(f"{path} is truncated or corrupt ({err})") from None
    except OSError as err:
        raise DataError(f"cannot read IDX file {path}: {err.strerror or err}") from None


def _find_idx(directory: Path, stem: str) -> Path | None:
    for sub in (directory, directory / "FashionMNIST" / "raw", directory / "fashion-mnist"):
        for name in (stem + ".gz", stem):
            if (sub / name).is_file():
                return sub / name
    return None


def _fashion_mnist_dir(data_dir: Path | None, download: bool) -> Path:
    if data_dir is not None:
        # A given data_dir is used or refused: falling back to another copy would train on data the
        # user did not choose (a typo in the path would go unnoticed).
        if not data_dir.is_dir():
            what = "is not a directory" + ("" if data_dir.exists() else " (it does not exist)")
            raise DataNotFoundError(f"fashion_mnist: data_dir {data_dir} {what}; leave it out to use "
                                    f"{FASHION_MNIST_SYSTEM_DIR} (`apt-get install dataset-fashion-mnist`)")
        missing = [s for s in _FASHION_STEMS if _find_idx(data_dir, s) is None]
        if missing:
            raise DataNotFoundError(
                f"fashion_mnist: data_dir {data_dir} lacks {', '.join(m + '[.gz]' for m in missing)} "
                "(looked in it, FashionMNIST/raw/ and fashion-mnist/); leave it out to use "
                f"{FASHION_MNIST_SYSTEM_DIR} (`apt-get install dataset-fashion-mnist`)")
        return data_dir
    # No data_dir: the system copy, else the cache (downloaded there when allowed).
    target = DEFAULT_CACHE_DIR / "fashion-mnist"
    tried = [FASHION_MNIST_SYSTEM_DIR, target]
    for d in tried:
        if all(_find_idx(d, s) for s in _FASHION_STEMS):
            return d
    if download:
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(target), train=True, download=True)
            FashionMNIST(str(target), train=False, download=True)
            if all(_find_idx(target, s) for s in _FASHION_STEMS):
                return target
        except Exception as err:  # no network, proxy, disk full...
            warnings.warn(f"Fashion-MNIST download into {target} failed: {err}", stacklevel=3)
    raise DataNotFoundError(
        "Fashion-MNIST not found: looked for {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] in "
        + ", ".join(str(d) for d in tried)
        + ("" if download else " (download disabled)")
        + "; install it with `apt-get install dataset-fashion-mnist` or pass data_dir")


def _load_fashion_mnist(data_dir: Path | None, split: str, download: bool) -> TensorImageDataset:
    d = _fashion_mnist_dir(data_dir, download)
    prefix = "train" if split == "train" else "t10k"
    images_file = _find_idx(d, f"{prefix}-images-idx3-ubyte")
    labels_file = _find_idx(d, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"Fashion-MNIST in {d}: images {images.shape} and labels {labels.shape} do not match")
    info = _INFO["fashion_mnist"]
    if images.shape[1:] != (28, 28):
        raise DataError(f"Fashion-MNIST in {d}: images are {images.shape[1:]}, expected (28, 28)")
    if not len(labels):
        raise DataError(f"Fashion-MNIST: {images_file} holds no images")
    if labels.max() >= info.num_classes:
        raise DataError(f"Fashion-MNIST: {labels_file} holds label {labels.max()}, outside [0, 10)")
    return TensorImageDataset(torch.from_numpy(images.copy()).unsqueeze(1),
                              torch.from_numpy(labels.astype(np.int64)), info, split)


# ---------------------------------------------------------------------------------------------
# CIFAR-10/100 (python pickles)

_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}


def _read_cifar_batch(name: str, path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` and labels of one CIFAR batch, unpickled without running code."""
    try:
        with open(path, "rb") as fh:
            entry = load_data_pickle(fh, encoding="latin1")
    except OSError as err:
        raise DataError(f"{name}: cannot read {path}: {err.strerror or err}") from None
    except RefusedGlobal as err:
        raise DataError(f"{name}: {path} is refused: it names {err.qualified_name}, and a CIFAR batch holds "
                        f"only {ADMITTED} (a pickle that names other globals can run code; "
                        "nothing of it was run)") from None
    except Exception as err:  # a pickle fails in many ways: EOFError, UnpicklingError, ValueError...
        raise DataError(f"{name}: {path} is not a CIFAR pickle (truncated or corrupt: "
                        f"{type(err).__name__}: {err})") from None
    if not isinstance(entry, dict):
        raise DataError(f"{name}: {path} holds a {type(entry).__name__}, not a CIFAR batch dict with 'data' "
                        f"and {label_key!r}")
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    missing = [k for k in ("data", label_key) if k not in entry]
    if missing:
        raise DataError(f"{name}: {path} is not a CIFAR pickle with 'data' and {label_key!r} "
                        f"(no {', '.join(map(repr, missing))}; keys: {sorted(map(str, entry))[:6]})")
    try:
        raw = np.asarray(entry["data"])
        lab = np.asarray(entry[label_key])
        out_of_bytes = raw.dtype.kind in "iu" and raw.size and (raw.min() < 0 or raw.max() > 255)
        if raw.dtype != np.uint8 and (raw.dtype.kind not in "iu" or out_of_bytes):
            raise ValueError(f"'data' must hold bytes 0..255, got dtype {raw.dtype}")
        if lab.ndim != 1 or (lab.size and lab.dtype.kind not in "iu"):
            raise ValueError(f"{label_key!r} must be a list of integers, got {lab.dtype} {lab.shape}")
        if raw.size % 3072:
            raise ValueError(f"'data' holds {raw.size} values, not a whole number of 3x32x32 images")
        arr = raw.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32)
    except (ValueError, TypeError, OverflowError) as err:
        raise DataError(f"{name}: {path} is not a CIFAR pickle: {err}") from None
    if len(arr) != len(lab):
        raise DataError(f"{name}: {path} has {len(arr)} images but {len(lab)} labels")
    return arr, lab.astype(np.int64)


def _load_cifar(name: str, root: Path, split: str) -> TensorImageDataset:
    # Read the pickles ourselves: torchvision.datasets.CIFAR10 refuses any file whose md5 differs from
    # the official archive, which rules out subsets and test stand-ins, and its error names no path;
    # it also unpickles with pickle.load, which runs whatever code a file names.
    sub, train_files, test_files, label_key = _CIFAR[name]
    base = root / sub if (root / sub).is_dir() else root
    files = train_files if split == "train" else test_files
    layout = (f"{root}/{sub}/{{{','.join(train_files + test_files)}}} "
              "(the python-pickle CIFAR archive, extracted)")
    missing = [f for f in files if not (base / f).is_file()]
    if missing:
        raise DataNotFoundError(f"{name}: {base / missing[0]} not found; expected {layout}")
    data, labels = [], []
    for f in files:
        arr, lab = _read_cifar_batch(name, base / f, label_key)
        data.append(arr)
        labels.append(lab)
    info = _INFO[name]
    targets = torch.from_numpy(np.concatenate(labels))
    if not targets.numel():
        raise DataError(f"{name}: the {split} split in {base} holds no images")
    if targets.min() < 0 or targets.max() >= info.num_classes:
        raise DataError(f"{name}: labels in {base} outside [0, {info.num_classes})")
    return TensorImageDataset(torch.from_numpy(np.concatenate(data)), targets, info, split)


# ---------------------------------------------------------------------------------------------
# STL-10 (binary)

_STL_SHAPE = (3, 96, 96)


def _stl_count(path: Path) -> int:
    size = path.stat().st_size
    per = math.prod(_STL_SHAPE)
    if size % per:
        raise DataError(f"stl10: {path} holds {size} bytes, not a multiple of one 3x96x96 image ({per})")
    if not size:
        raise DataError(f"stl10: {path} is empty (no images)")
    return size // per


def _load_stl10(root: Path, split: str) -> TensorImageDataset:
    try:
        return _read_stl10(root, split)
    except DataNotFoundError:
        raise
    except OSError as err:  # unreadable file (permissions, I/O error) or vanished while read
        where = f" {err.filename}" if err.filename else ""
        raise DataError(f"stl10: cannot read{where}: {err.strerror or err}") from None


def _read_stl10(root: Path, split: str) -> TensorImageDataset:
    base = root / "stl10_binary" if (root / "stl10_binary").is_dir() else root
    parts = {"train": ["train"], "test": ["test"], "unlabeled": ["unlabeled"],
             "train+unlabeled": ["train", "unlabeled"]}[split]
    layout = (f"{root}/stl10_binary/{{train_X.bin,train_y.bin,test_X.bin,test_y.bin,unlabeled_X.bin}} "
              "(the STL-10 binary archive, extracted)")
    for p in parts:
        for suffix in ("_X.bin",) + (("_y.bin",) if p != "unlabeled" else ()):
            if not (base / f"{p}{suffix}").is_file():
                raise DataNotFoundError(f"stl10: {base / (p + suffix)} not found; expected {layout}")
    counts = [_stl_count(base / f"{p}_X.bin") for p in parts]
    images = torch.empty((sum(counts), *_STL_SHAPE), dtype=torch.uint8)
    targets = []
    start = 0
    for p, n in zip(parts, counts, strict=True):
        mm = np.memmap(base / f"{p}_X.bin", dtype=np.uint8, mode="r", shape=(n, *_STL_SHAPE))
        # The binary stores each plane column-major: transpose H and W, in chunks to bound memory.
        for i in range(0, n, 8192):
            chunk = np.ascontiguousarray(mm[i:i + 8192].transpose(0, 1, 3, 2))
            images[start + i:start + i + len(chunk)] = torch.from_numpy(chunk)
        del mm
        if p == "unlabeled":
            targets.append(torch.full((n,), -1, dtype=torch.long))
        else:
            y = np.fromfile(base / f"{p}_y.bin", dtype=np.uint8).astype(np.int64) - 1
            if len(y) != n:
                raise DataError(f"stl10: {base / (p + '_y.bin')} holds {len(y)} labels but "
                                f"{base / (p + '_X.bin')} {n} images (one of them truncated?)")
            if y.min() < 0 or y.max() > 9:
                raise DataError(f"stl10: {base / (p + '_y.bin')} holds labels outside 1..10")
            targets.append(torch.from_numpy(y))
        start += n
    return TensorImageDataset(images, torch.cat(targets), _INFO["stl10"], split)


# ---------------------------------------------------------------------------------------------
# ImageFolder trees


def _has_images(d: Path) -> bool:
    return any(e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS) for e in os.scandir(d))


def _class_dirs(d: Path) -> list[str]:
    from torchvision.datasets.folder import find_classes

    try:
        return find_classes(str(d))[0]
    except FileNotFoundError:
        return []


def _class_files(class_dir: str) -> list[str]:
    """Image files under one class folder in torchvision's ``make_dataset`` order (``os.walk``
    following links, folders sorted, files sorted), but each folder and each file taken once: a
    symlink loop or two links to one photo would otherwise repeat images and skew the class.
    Folders are walked in sorted order, so which of two links is kept does not depend on the disk."""
    folders, seen_dirs, seen_files = [], set(), set()
    stack = [class_dir]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:  # unreadable or vanished: os.walk skips it too
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        files, subfolders = [], []
        for e in entries:
            try:
                if e.is_dir():
                    subfolders.append(e.path)
                elif e.name.lower().endswith(IMG_EXTENSIONS) and e.is_file():
                    # inode() comes free with the folder listing; a link costs one stat of its target
                    target = e.stat() if e.is_symlink() else None
                    key = (target.st_dev, target.st_ino) if target else (st.st_dev, e.inode())
                    if key not in seen_files:
                        seen_files.add(key)
                        files.append(e.name)
            except OSError:
                continue
        folders.append((folder, files))
        stack.extend(reversed(subfolders))  # depth-first, in sorted order
    folders.sort(key=lambda f: f[0])
    return [os.path.join(folder, name) for folder, files in folders for name in files]


def scan_image_folder(d: Path, classes: Sequence[str] | None = None
                      ) -> tuple[list[str], list[int], list[str]]:
    """Files and targets of an ImageFolder tree in torchvision's order, or of a flat folder (targets -1).

    ``classes`` (e.g. the train split's) fixes the class-to-index map of a val/test split.
    """
    own = _class_dirs(d)
    if own:
        if classes is None:
            classes = own
        unknown = sorted(set(own) - set(classes))
        if unknown:
            raise DataError(f"{d}: class folder(s) {unknown[:5]} not among the {len(classes)} "
                            "training classes")
        paths, targets = [], []
        for target, cls in enumerate(classes):
            if (d / cls).is_dir():
                found = _class_files(str(d / cls))
                paths += found
                targets += [target] * len(found)
        if _has_images(d):
            warnings.warn(f"{d}: image files beside the class folders are ignored", stacklevel=3)
        return paths, targets, list(classes)
    paths = sorted(str(d / e.name) for e in os.scandir(d)
                   if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
    return paths, [-1] * len(paths), []


_FOLDER_LAYOUT = ("an ImageFolder tree DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg (or test/), "
                  "or a flat folder of images (unlabeled)")


def _load_folder(name: str, root: Path, split: str, image_size: int | None, crop_fraction: float,
                 on_corrupt: str, max_image_pixels: int | None) -> FileImageDataset:
    if not root.is_dir():
        raise DataNotFoundError(f"{name}: data_dir {root} is not a directory; expected {_FOLDER_LAYOUT}")
    held_out = [root / "val", root / "test"]
    if split == "test":
        held_out.reverse()
    split_layout = any((root / s).is_dir() for s in ("train", "val", "test", "unlabeled"))
    if not split_layout:  # the root itself is the one (training) split: ImageFolder or flat
        d = root if split in ("train", "unlabeled") else None
    elif split in ("train", "unlabeled"):
        candidates = ([root / "unlabeled"] if split == "unlabeled" else []) + [root / "train"]
        d = next((c for c in candidates if c.is_dir()), None)
    else:
        d = next((c for c in held_out if c.is_dir()), None)
    if d is None:
        raise DataNotFoundError(f"{name}: no {split} split under {root}; expected {_FOLDER_LAYOUT}")
    train_classes = None
    if d.name in ("val", "test") and (root / "train").is_dir():
        train_classes = _class_dirs(root / "train") or None
    paths, targets, classes = scan_image_folder(d, train_classes)
    if not paths:
        raise DataNotFoundError(f"{name}: no images ({', '.join(IMG_EXTENSIONS)}) found under {d}; "
                                f"expected {_FOLDER_LAYOUT}")
    base = dataset_info(name, image_size=image_size)
    info = DatasetInfo(name, len(classes), 3, base.image_size, base.mean, base.std)
    return FileImageDataset(paths, torch.tensor(targets, dtype=torch.long), info, split, classes=classes,
                            root=root, crop_fraction=crop_fraction, on_corrupt=on_corrupt,
                            max_image_pixels=max_image_pixels)


# ---------------------------------------------------------------------------------------------


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
        raise DataNotFoundError(f"{name} needs data_dir; expected "
                                + {"cifar10": "DIR/cifar-10-batches-py/ (python-pickle layout)",
                                   "cifar100": "DIR/cifar-100-python/ (python-pickle layout)",
                                   "stl10": "DIR/stl10_binary/ (binary layout)",
                                   "voc2007": "DIR/[VOCdevkit/]VOC2007/ (the devkit layout)",
                                   }.get(name, _FOLDER_LAYOUT))
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
