"""A trained run and its evaluation data, loaded for a protocol (:mod:`emanorm.evaluation.protocols`).

:func:`prepare` turns an :class:`EvalRequest` (which run and network, which data and labels) into
an :class:`EvalContext`: the backbone on its device, the train and test splits, the evaluation
transform (adapted to the run's input on another dataset) and the labeled subsets.
Mistakes a user can fix raise :class:`emanorm.errors.UserError`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from emanorm.data import DatasetInfo, build_augmentation, load_dataset, select_labeled
from emanorm.errors import UserError
from emanorm.evaluation.features import ImageSource, dataset_batches, extract_features, resolve_device
from emanorm.evaluation.transfer import adapted_transform, describe_adaptation
from emanorm.train.restore import load_backbone

PROTOCOLS = ("knn", "linear", "finetune", "retrieval", "lowshot")
WHICH = ("teacher", "student")
# File datasets that load at any size: a run's image size is used directly (no second resize).
_SIZED_DATASETS = ("imagenet", "folder", "voc2007")

@dataclass
class EvalRequest:
    """What every protocol is asked: which run and network, on which data and labels, where to."""

    run: str
    which: str = "teacher"
    dataset: str | None = None
    data_dir: str | None = None
    labels_per_class: int | None = None
    label_fraction: float | None = None
    label_index_csv: str | None = None
    seed: int | None = None
    train_split: str = "auto"
    test_split: str = "auto"
    out: str | None = None
    device: str = "auto"
    batch_size: int = 256
    amp: bool = False
    no_progress: bool = False


# --- loading a run and its data ----------------------------------------------------------------------


def run_dir_of(path: str | Path) -> Path:
    """The run directory of a run directory or of a checkpoint file (``RUN_DIR/checkpoints/x.pt``)."""
    path = Path(path)
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def load_run_backbone(path: str | Path, which: str) -> tuple[nn.Module, dict[str, Any]]:
    """``emanorm.train.load_backbone`` with user-facing errors."""
    if not Path(path).exists():
        raise UserError(f"no run directory or checkpoint at '{path}'")
    try:
        backbone, config = load_backbone(path, which=which)
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise UserError(f"cannot load the {which} backbone from '{path}': {err}") from err
    return backbone, dict(config or {})


def load_split(name: str, split: str, data_dir: str | None, **options: Any) -> ImageSource:
    """One split of a dataset; a split that cannot be loaded is a :class:`UserError`."""
    try:
        return load_dataset(name, split, data_dir=data_dir, **options)
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise UserError(f"cannot load split '{split}' of dataset '{name}': {err}") from err


def load_test_split(name: str, split: str, data_dir: str | None, **options: Any) -> tuple[ImageSource, str]:
    """``(dataset, split name)`` of the evaluation split; ``auto`` is ``test``, else ``val``."""
    if split != "auto":
        return load_split(name, split, data_dir, **options), split
    errors = []
    for candidate in ("test", "val"):
        try:
            return load_dataset(name, candidate, data_dir=data_dir, **options), candidate
        except (ValueError, KeyError, FileNotFoundError) as err:
            errors.append(f"{candidate}: {err}")
    raise UserError(f"dataset '{name}' has no 'test' or 'val' split ({'; '.join(errors)}); pass --test-split")


def label_setting(request: EvalRequest) -> tuple[dict[str, Any], str]:
    """(JSON description, file-name suffix) of the requested label subset."""
    if request.labels_per_class is not None:
        return {"labels_per_class": request.labels_per_class}, f"_{request.labels_per_class}perclass"
    if request.label_index_csv is not None:
        return {"index_csv": str(request.label_index_csv)}, f"_{Path(request.label_index_csv).stem}"
    if request.label_fraction not in (None, 1.0):
        return {"label_fraction": request.label_fraction}, f"_{request.label_fraction * 100:g}pct"
    return {"label_fraction": 1.0}, ""


def frozen_features(
    backbone: nn.Module,
    dataset: ImageSource,
    indices: Tensor,
    device: torch.device,
    *,
    transform: nn.Module,
    batch_size: int = 256,
    amp: bool = False,
    progress: bool = False,
    desc: str = "features",
) -> tuple[Tensor, Tensor]:
    """``(features, labels)`` of ``dataset[indices]`` through a frozen ``backbone`` (eval transform)."""
    batches = dataset_batches(dataset, indices, batch_size)
    return extract_features(
        backbone, batches, device, transform=transform, amp=amp, progress=progress, desc=desc
    )


@dataclass
class EvalContext:
    """Everything a protocol needs once the run and the data are loaded."""

    request: EvalRequest
    backbone: nn.Module
    config: dict[str, Any]
    dataset: str
    data_dir: str | None
    test_split: str
    train_set: ImageSource
    test_set: ImageSource
    info: Any
    num_classes: int
    device: torch.device
    transform: nn.Module
    seed: int
    test_indices: Tensor
    labels: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    #: The input the backbone was trained on (the run's DatasetInfo; the target's when unknown).
    input_info: Any = None
    #: How the target's images were changed to match ``input_info`` (None: not at all).
    adaptation: dict[str, Any] | None = None
    #: Multi-label target (VOC07): labels are ``train_set.label_matrix`` / ``test_set.label_matrix``.
    multilabel: bool = False

    @property
    def progress(self) -> bool:
        return not self.request.no_progress

    def labeled(self, seed: int | None = None) -> Tensor:
        """Training indices with labels: the requested subset (for ``seed``) or every labeled image."""
        targets = torch.as_tensor(self.train_set.targets).long()
        r = self.request
        if r.labels_per_class is None and r.label_fraction in (None, 1.0) and r.label_index_csv is None:
            return torch.nonzero(targets >= 0).flatten()
        try:
            idx = select_labeled(
                targets,
                self.num_classes,
                labels_per_class=r.labels_per_class,
                fraction=None if r.labels_per_class else r.label_fraction,
                index_csv=r.label_index_csv,
                seed=self.seed if seed is None else seed,
            )
        except (ValueError, FileNotFoundError) as err:
            raise UserError(f"cannot select the labeled subset: {err}") from err
        return torch.as_tensor(idx, dtype=torch.long)

    def features(self, dataset: ImageSource, indices: Tensor, desc: str) -> tuple[Tensor, Tensor]:
        return frozen_features(
            self.backbone, dataset, indices, self.device, transform=self.transform,
            batch_size=self.request.batch_size, amp=self.request.amp, progress=self.progress, desc=desc,
        )


def _dataset_info(fields: dict[str, Any]) -> DatasetInfo:
    return DatasetInfo(**{**fields, "mean": tuple(fields["mean"]), "std": tuple(fields["std"])})


def prepare(request: EvalRequest, *, multilabel_ok: bool = False) -> EvalContext:
    """Load the backbone, the datasets and the evaluation transform for a protocol.

    On a dataset other than the run's, images are brought to the run's input (channels, size,
    normalisation; see :mod:`emanorm.evaluation.transfer`) and the target's own labels are used.
    A multi-label dataset (VOC07) is refused unless ``multilabel_ok`` (low-shot only).
    """
    device = resolve_device(request.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {request.device}: no CUDA device is available; use cpu or auto")
    if Path(request.run).exists():  # before any work: a result that cannot be written would be lost
        check_writable(Path(request.out) if request.out else None, run_dir_of(request.run))
    backbone, config = load_run_backbone(request.run, request.which)
    dataset = request.dataset or config.get("dataset")
    if not dataset:
        raise UserError(f"the run at '{request.run}' records no dataset; pass --dataset")
    # The run's data_dir belongs to the run's dataset; another dataset needs its own --data-dir.
    data_dir = request.data_dir or (config.get("data_dir") if dataset == config.get("dataset") else None)
    run_info = _dataset_info(config["dataset_info"]) if config.get("dataset_info") else None
    # File datasets decode straight to the run's image size (one resize, not two).
    options = {"image_size": run_info.image_size} if run_info and dataset in _SIZED_DATASETS else {}
    train_split = request.train_split
    if train_split == "auto":
        train_split = "trainval" if dataset == "voc2007" else "train"
    train_set = load_split(dataset, train_split, data_dir, **options)
    test_set, test_split = load_test_split(dataset, request.test_split, data_dir, **options)
    info = getattr(train_set, "info", None)
    multilabel = bool(getattr(train_set, "multilabel", False))
    if multilabel and not multilabel_ok:
        raise UserError(
            f"dataset '{dataset}' is multi-label; only `emanorm eval lowshot` evaluates it "
            "(one binary SVM per class, mean average precision)"
        )
    num_classes = getattr(info, "num_classes", None)
    if not num_classes:  # an info without a class count (e.g. a generic folder dataset)
        num_classes = int(torch.as_tensor(train_set.targets).max()) + 1
    if multilabel:
        test_indices = torch.arange(len(test_set))
    else:
        test_targets = torch.as_tensor(test_set.targets).long()
        test_indices = torch.nonzero(test_targets >= 0).flatten()
    if len(test_indices) == 0:
        raise UserError(f"split '{test_split}' of '{dataset}' has no labels to evaluate against")
    seed = request.seed if request.seed is not None else int(config.get("seed", 0) or 0)
    backbone.to(device)
    labels, _ = label_setting(request)
    input_info, adaptation, transform = info, None, None
    if run_info is not None and info is not None:
        input_info, adaptation = run_info, describe_adaptation(info, run_info)
        try:
            transform = adapted_transform(info, run_info, build_augmentation("none", run_info))
        except ValueError as err:
            raise UserError(f"cannot feed '{dataset}' images to this run's backbone: {err}") from err
    if transform is None:
        transform = build_augmentation("none", info)
    return EvalContext(
        request=request,
        backbone=backbone,
        config=config,
        dataset=dataset,
        data_dir=data_dir,
        test_split=test_split,
        train_set=train_set,
        test_set=test_set,
        info=info,
        num_classes=int(num_classes),
        device=device,
        transform=transform,
        seed=seed,
        test_indices=test_indices,
        labels=labels,
        input_info=input_info,
        adaptation=adaptation,
        multilabel=multilabel,
    )


def check_writable(out: Path | None, default_dir: Path) -> None:
    """Refuse an output that cannot be written: ``out`` a directory, or a folder that is read-only."""
    if out is not None and out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file path")
    folder = out.parent if out is not None else default_dir
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not os.access(folder, os.W_OK):
        raise UserError(f"cannot write to {folder} (read-only); choose another place with --out")
