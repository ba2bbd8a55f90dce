"""The on-disk formats: Fashion-MNIST IDX (and its download policy), CIFAR python pickles, STL-10
binary and ImageFolder trees. Readers are written against the published layouts; see docs/data.md."""

from __future__ import annotations

import gzip
import math
import os
import struct
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from emanorm.catalog import (  # where the command line's early checks read them too
    FASHION_MNIST_SYSTEM_DIR,
    FOLDER_LAYOUT,
)
from emanorm.data.images import FileImageDataset
from emanorm.data.registry import (
    _INFO,
    IMG_EXTENSIONS,
    DataError,
    DataNotFoundError,
    DatasetInfo,
    TensorImageDataset,
    dataset_info,
)
from emanorm.data.safe_pickle import ADMITTED, RefusedGlobal, load_data_pickle

DEFAULT_CACHE_DIR = Path(os.environ.get("EMANORM_DATA_CACHE",
                                        Path.home() / ".cache" / "emanorm" / "datasets"))

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


_FOLDER_LAYOUT = FOLDER_LAYOUT


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
