"""Pascal VOC 2007 as a multi-label classification dataset (the low-shot rows of the paper's Table 5).

Layout (the devkit's, as extracted from ``VOCtrainval_06-Nov-2007.tar`` and
``VOCtest_06-Nov-2007.tar``)::

    DIR/[VOCdevkit/]VOC2007/JPEGImages/<id>.jpg
    DIR/[VOCdevkit/]VOC2007/ImageSets/Main/<class>_<split>.txt   "<id> 1|-1|0" per line
    DIR/[VOCdevkit/]VOC2007/ImageSets/Main/<split>.txt            "<id>" per line
    DIR/[VOCdevkit/]VOC2007/Annotations/<id>.xml

Labels come from the per-class files when all 20 exist for the split (the official
classification labels); otherwise from the XML annotations of the images listed in
``<split>.txt``: a class is ``1`` if the image holds a non-difficult object of it, ``0`` if it
holds only difficult ones, ``-1`` if none. ``0`` ("difficult") is ignored for that class when
training and scoring, as the VOC classification benchmark does.
"""

from __future__ import annotations

import warnings
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from emanorm.data.images import FileImageDataset, decode_image_file
from emanorm.data.registry import DataError, DataNotFoundError, DatasetInfo, dataset_info

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip
VOC_SPLITS: tuple[str, ...] = ("train", "val", "trainval", "test")
VOC_INFO = dataset_info("voc2007")
_LAYOUT = (
    "DIR/[VOCdevkit/]VOC2007/{JPEGImages/<id>.jpg, ImageSets/Main/<class>_<split>.txt "
    "or ImageSets/Main/<split>.txt + Annotations/<id>.xml}"
)


class VOCDataset(FileImageDataset):
    """VOC images with a multi-label target matrix.

    ``label_matrix`` is int8 ``(N, 20)``: 1 present, -1 absent, 0 difficult (ignored).
    ``targets`` is all -1: a VOC image has no single class, so single-label protocols and the
    labeled side of a batch stream see it as unlabeled (the unlabeled side may use it).
    """

    multilabel = True

    def __init__(self, paths: Sequence[str], label_matrix: Tensor, info: DatasetInfo, split: str, *,
                 ids: Sequence[str], root: str | Path, crop_fraction: float = 1.0,
                 on_corrupt: str = "error") -> None:
        if on_corrupt not in ("error", "skip"):
            raise DataError(f"on_corrupt={on_corrupt!r}; choose 'error' or 'skip'")
        ids, paths = list(ids), [str(p) for p in paths]
        if on_corrupt == "skip":  # filter here so the label matrix stays aligned with the paths
            good = [i for i, p in enumerate(paths) if _readable(p)]
            if len(good) < len(paths):
                bad = [paths[i] for i in sorted(set(range(len(paths))) - set(good))]
                warnings.warn(f"skipping {len(bad)} unreadable image(s): " + ", ".join(bad), stacklevel=2)
            ids, paths = [ids[i] for i in good], [paths[i] for i in good]
            label_matrix = label_matrix[torch.as_tensor(good, dtype=torch.long)]
        super().__init__(paths, torch.full((len(paths),), -1, dtype=torch.long), info, split,
                         classes=VOC_CLASSES, root=root, crop_fraction=crop_fraction)
        self.ids = ids
        self.label_matrix = label_matrix.to(torch.int8)


def _readable(path: str) -> bool:
    try:
        decode_image_file(path, 3)
        return True
    except DataError:
        return False


def find_voc_root(data_dir: str | Path) -> Path:
    """The ``VOC2007`` directory under ``data_dir`` (itself, ``VOC2007/`` or ``VOCdevkit/VOC2007/``)."""
    root = Path(data_dir).expanduser()
    for candidate in (root, root / "VOC2007", root / "VOCdevkit" / "VOC2007"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise DataNotFoundError(f"voc2007: no JPEGImages/ under {root}; expected {_LAYOUT}")


def _read_lines(path: Path) -> list[list[str]]:
    try:
        return [line.split() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"voc2007: cannot read {path}: {err}") from err


def _labels_from_class_files(main: Path, split: str) -> tuple[list[str], np.ndarray]:
    ids: list[str] | None = None
    columns = []
    for cls in VOC_CLASSES:
        path = main / f"{cls}_{split}.txt"
        rows = _read_lines(path)
        bad = [r for r in rows if len(r) != 2 or r[1] not in ("1", "-1", "0")]
        if bad:
            raise DataError(f"voc2007: {path}: expected '<id> 1|-1|0' lines, got {' '.join(bad[0])!r}")
        these = [r[0] for r in rows]
        if ids is None:
            ids = these
        elif these != ids:
            first = main / f"{VOC_CLASSES[0]}_{split}.txt"
            raise DataError(f"voc2007: {path} lists other images than {first}")
        columns.append([int(r[1]) for r in rows])
    assert ids is not None
    return ids, np.asarray(columns, dtype=np.int8).T.reshape(len(ids), len(VOC_CLASSES))


def parse_annotation(path: str | Path) -> list[tuple[str, bool]]:
    """``(class name, difficult)`` of every object in a VOC XML annotation."""
    try:
        data = Path(path).read_bytes()
        # VOC annotations declare no DTD; one that does may expand entities without bound (the
        # "billion laughs"), which only newer expat versions stop by themselves.
        if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
            raise DataError(f"voc2007: annotation {path} declares a DTD or entities, which VOC annotations "
                            "do not (refused unparsed)")
        root = ET.fromstring(data)
    except (OSError, ET.ParseError) as err:
        raise DataError(f"voc2007: cannot parse annotation {path}: {err}") from None
    objects = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        objects.append((name, difficult))
    return objects


def _labels_from_annotations(root: Path, split: str) -> tuple[list[str], np.ndarray]:
    listing = root / "ImageSets" / "Main" / f"{split}.txt"
    ids = [r[0] for r in _read_lines(listing)]
    index = {c: i for i, c in enumerate(VOC_CLASSES)}
    labels = np.full((len(ids), len(VOC_CLASSES)), -1, dtype=np.int8)
    for row, image_id in enumerate(ids):
        xml = root / "Annotations" / f"{image_id}.xml"
        if not xml.is_file():
            raise DataNotFoundError(f"voc2007: {xml} not found (listed in {listing}); expected {_LAYOUT}")
        for name, difficult in parse_annotation(xml):
            if name not in index:
                allowed = ", ".join(VOC_CLASSES)
                raise DataError(f"voc2007: {xml}: unknown class {name!r}; VOC classes: {allowed}")
            col = index[name]
            if not difficult:
                labels[row, col] = 1
            elif labels[row, col] == -1:
                labels[row, col] = 0
    return ids, labels


def read_voc_labels(root: str | Path, split: str) -> tuple[list[str], np.ndarray]:
    """Image ids and the int8 ``(N, 20)`` label matrix (1 / -1 / 0 difficult) of a VOC2007 split."""
    if split not in VOC_SPLITS:
        raise DataError(f"unknown split {split!r} for voc2007; choose one of {', '.join(VOC_SPLITS)}")
    root = Path(root)
    main = root / "ImageSets" / "Main"
    present = [c for c in VOC_CLASSES if (main / f"{c}_{split}.txt").is_file()]
    if len(present) == len(VOC_CLASSES):
        return _labels_from_class_files(main, split)
    if (main / f"{split}.txt").is_file() and (root / "Annotations").is_dir():
        return _labels_from_annotations(root, split)
    if present:
        missing = [c for c in VOC_CLASSES if c not in present]
        raise DataNotFoundError(f"voc2007: {main} has {len(present)} of the 20 <class>_{split}.txt files "
                                f"(missing e.g. {', '.join(missing[:3])}) and no {split}.txt + Annotations/")
    raise DataNotFoundError(f"voc2007: no labels for split {split!r} under {root}; expected {_LAYOUT}")


def load_voc2007(data_dir: str | Path, split: str, *, image_size: int | None = None,
                 crop_fraction: float = 1.0, on_corrupt: str = "error") -> VOCDataset:
    """Split ``split`` (train, val, trainval, test) of VOC2007 as a :class:`VOCDataset`."""
    root = find_voc_root(data_dir)
    ids, labels = read_voc_labels(root, split)
    if not ids:
        raise DataNotFoundError(f"voc2007: split {split!r} under {root} lists no images")
    paths = [root / "JPEGImages" / f"{i}.jpg" for i in ids]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataNotFoundError(
            f"voc2007: {len(missing)} image(s) of split {split!r} missing, e.g. {missing[0]}"
        )
    info = VOC_INFO
    if image_size is not None:
        info = DatasetInfo(info.name, info.num_classes, info.channels, image_size, info.mean, info.std)
    return VOCDataset([str(p) for p in paths], torch.from_numpy(labels), info, split, ids=ids, root=root,
                      crop_fraction=crop_fraction, on_corrupt=on_corrupt)
