"""Labeled subsets: balanced per class, deterministic from the seed alone (identical on every rank)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from emanorm.data.registry import DataError, DataNotFoundError

SPLIT_COLUMN = "Index"
_INDEX_MIN, _INDEX_MAX = -(2**63), 2**63 - 1


def select_labeled(targets: Tensor, num_classes: int, *, labels_per_class: int | None = None,
                   fraction: float | None = None, index_csv: str | Path | None = None,
                   seed: int = 0) -> Tensor:
    """Sorted dataset indices of the labeled subset.

    Exactly one of ``labels_per_class`` (that many per class), ``fraction`` (that share of each
    class, rounded, at least one) or ``index_csv`` (a file with an ``Index`` column, e.g. the
    ImageNet 1%/10% subsets) chooses it. The draw uses ``numpy.random.RandomState(seed)`` only,
    whose stream NumPy keeps frozen: the same seed gives the same split on every rank and version.
    """
    targets = torch.as_tensor(targets).long().cpu()
    chosen = [name for name, v in (("labels_per_class", labels_per_class), ("fraction", fraction),
                                   ("index_csv", index_csv)) if v is not None]
    if len(chosen) != 1:
        raise DataError("give exactly one of labels_per_class, fraction, index_csv; got "
                        + (", ".join(chosen) or "none"))
    if index_csv is not None:
        idx = read_split_csv(index_csv)
        if idx.numel() and (idx.min() < 0 or idx.max() >= len(targets)):
            bad = idx[(idx < 0) | (idx >= len(targets))][0].item()
            raise DataError(f"{index_csv}: Index {bad} out of range for a dataset of {len(targets)} images")
        if torch.unique(idx).numel() != idx.numel():
            raise DataError(f"{index_csv}: repeated Index values")
        unknown = idx[targets[idx] < 0]
        if unknown.numel():
            raise DataError(f"{index_csv}: Index {unknown[0].item()} has no label (target -1)")
        return torch.sort(idx).values

    labeled = targets[targets >= 0]
    if labeled.numel() and labeled.max() >= num_classes:
        raise DataError(f"target {labeled.max().item()} >= num_classes={num_classes}")
    if labels_per_class is not None and (int(labels_per_class) != labels_per_class or labels_per_class < 1):
        raise DataError(f"labels_per_class={labels_per_class} must be a positive integer")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise DataError(f"fraction={fraction} must be in (0, 1]")

    rng = np.random.RandomState(seed)
    t = targets.numpy()
    picked = []
    for c in range(num_classes):
        members = np.flatnonzero(t == c)
        if labels_per_class is not None:
            k = int(labels_per_class)
            if k > len(members):
                raise DataError(f"labels_per_class={k} but class {c} has only {len(members)} labeled images")
        else:
            if len(members) == 0:
                continue
            k = max(1, round(fraction * len(members)))
        # Classes draw in order from the one stream: the split depends only on (targets, seed).
        picked.append(members[rng.permutation(len(members))[:k]])
    if not picked:
        raise DataError("no labeled images: every target is -1")
    return torch.from_numpy(np.sort(np.concatenate(picked))).long()


def write_split_csv(indices: Tensor, path: str | Path) -> None:
    """Write indices as a one-column CSV with header ``Index`` (the paper's subset format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([SPLIT_COLUMN])
        w.writerows([int(i)] for i in torch.as_tensor(indices).long().tolist())


def read_split_csv(path: str | Path) -> Tensor:
    """Indices from a CSV with an ``Index`` column (other columns are ignored), in file order."""
    path = Path(path)
    if path.exists() and not path.is_file():  # a FIFO would block the reader forever
        kind = "a directory" if path.is_dir() else "not a regular file (a FIFO, device or socket)"
        raise DataError(f"split CSV {path} is {kind}; give a CSV file")
    if not path.is_file():
        raise DataNotFoundError(f"split CSV {path} not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return _read_index_column(csv.DictReader(f), path)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not a text CSV (byte {err.start} is not UTF-8)") from None
    except csv.Error as err:  # NUL bytes, a field over csv.field_size_limit()...
        raise DataError(f"{path}: not a readable CSV ({err})") from None
    except OSError as err:
        raise DataError(f"cannot read split CSV {path}: {err.strerror or err}") from None


def _read_index_column(reader: csv.DictReader, path: Path) -> Tensor:
    fields = [h.strip() for h in (reader.fieldnames or [])]
    if SPLIT_COLUMN not in fields:
        raise DataError(f"{path}: no {SPLIT_COLUMN!r} column (found {fields or 'no header'})")
    if fields.count(SPLIT_COLUMN) > 1:  # DictReader would silently keep the last one
        raise DataError(f"{path}: {fields.count(SPLIT_COLUMN)} columns named {SPLIT_COLUMN!r}; keep one")
    reader.fieldnames = fields
    values = []
    for line, row in enumerate(reader, start=2):
        raw = (row.get(SPLIT_COLUMN) or "").strip()
        try:
            value = int(raw)
        except ValueError:
            raise DataError(f"{path}:{line}: Index {_shorten(raw)!r} is not an integer") from None
        if not _INDEX_MIN <= value <= _INDEX_MAX:  # torch.tensor would fail without naming the file
            raise DataError(f"{path}:{line}: Index {_shorten(raw)} is not a dataset index (beyond 64 bits)")
        values.append(value)
    return torch.tensor(values, dtype=torch.long)


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
