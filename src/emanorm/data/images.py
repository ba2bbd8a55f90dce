"""Image files: safe decoding (size limit, JPEG DCT scaling, nvJPEG), crop geometry, and the
dataset that decodes them when fetched (``FileImageDataset``)."""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from emanorm.data.registry import DataError, DatasetInfo, ImageDataset

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
            raise DataError(f"cannot decode image file {path}: {_pillow_reason(err)}") from err
    except Exception as err:
        raise DataError(f"cannot decode image file {path}: {_pillow_reason(err)}") from err
    width, height = im.size
    if max_pixels is not None and width * height > max_pixels:
        im.close()
        raise DataError(f"image file {path} is {width}x{height} = {width * height} pixels, above the limit "
                        f"max_image_pixels={max_pixels} (a decompression bomb?); raise the limit to read it")
    return im


def _pillow_reason(err: Exception) -> str:
    """Pillow's complaint without the in-memory buffer it names (``<_io.BytesIO object at 0x...>``):
    the message already names the file."""
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(err)).strip()
    return text or type(err).__name__


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
        message = _pillow_reason(err).splitlines()[0]
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
