"""Small ImageNet-like JPEG folders made from the photographs scikit-image ships (no download).

For tests, the file-pipeline benchmark and smoke runs on real photos rather than noise:
``write_photo_folder(root)`` writes ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``, one
class per photograph, each image a random crop of it resized so that its sides lie in
``[min_side, max_side]`` (ImageNet's photos are mostly 300-500 px), saved as JPEG quality 90.
scikit-image is an optional dependency (``pip install 'emanorm[dev]'`` or ``emanorm[bench]``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from emanorm.errors import UserError

# RGB photographs stored inside the scikit-image wheel itself (skimage.data loads them from disk).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
          "retina", "colorwheel")


def photo(name: str) -> np.ndarray:
    """The scikit-image photograph ``name`` (one of ``PHOTOS``) as uint8 ``(H, W, 3)``."""
    if name not in PHOTOS:
        raise UserError(f"unknown photo {name!r}; choose one of {', '.join(PHOTOS)}")
    try:
        from skimage import data
    except ImportError:
        raise UserError("the sample photos need scikit-image: pip install 'emanorm[dev]' "
                        "(or pip install scikit-image)") from None
    return np.ascontiguousarray(getattr(data, name)()[..., :3])


def _sample(img: np.ndarray, rng: np.random.Generator, min_side: int, max_side: int) -> Image.Image:
    """A random crop of ``img`` (at least half its sides, aspect 3:4 to 4:3 where the photo allows),
    resized so that its longer side is uniform in ``[min_side, max_side]`` and its shorter side at
    least ``min_side`` (capped at ``max_side``)."""
    height, width = img.shape[:2]
    h = int(rng.integers(height // 2, height + 1))
    w = int(np.clip(h * rng.uniform(3 / 4, 4 / 3), width // 2, width))
    top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    crop = Image.fromarray(img[top:top + h, left:left + w])
    longer = int(rng.integers(min_side, max_side + 1))
    scale = max(longer / max(h, w), min_side / min(h, w))
    size = (min(max_side, max(1, round(w * scale))), min(max_side, max(1, round(h * scale))))
    return crop.resize(size, Image.BICUBIC)


def write_photo_folder(root: str | Path, *, classes: int = 3, per_class: int = 4, val_per_class: int = 1,
                       min_side: int = 300, max_side: int = 600, quality: int = 90, seed: int = 0) -> Path:
    """Write an ImageFolder tree of real photographs under ``root`` (see the module notes); returns
    ``root``. Class ``k`` is photo ``PHOTOS[k % 8]``; the same arguments write the same files."""
    if classes < 1 or per_class < 0 or val_per_class < 0 or not 1 <= min_side <= max_side:
        raise UserError(f"write_photo_folder: classes={classes}, per_class={per_class}, "
                        f"val_per_class={val_per_class}, sides {min_side}-{max_side} are not valid")
    root = Path(root)
    rng = np.random.default_rng(seed)
    cache: dict[str, np.ndarray] = {}
    for k in range(classes):
        name = PHOTOS[k % len(PHOTOS)]
        img = cache.setdefault(name, photo(name))
        for split, n in (("train", per_class), ("val", val_per_class)):
            folder = root / split / f"{k:03d}_{name}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _sample(img, rng, min_side, max_side).save(folder / f"{name}_{i:05d}.jpg", quality=quality)
    return root
