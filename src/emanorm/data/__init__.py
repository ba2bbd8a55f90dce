"""Datasets, labeled splits, batched per-sample augmentations and the batch stream (docs/data.md)."""

from emanorm.data.augment import AUGMENTATIONS, BatchAugment, build_augmentation
from emanorm.data.datasets import (
    DATASETS,
    DataError,
    DataNotFoundError,
    DatasetInfo,
    FileImageDataset,
    ImageDataset,
    TensorImageDataset,
    dataset_info,
    load_dataset,
    pretrain_split,
)
from emanorm.data.splits import read_split_csv, select_labeled, write_split_csv
from emanorm.data.stream import BatchStream, eval_batches

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "BatchAugment",
    "BatchStream",
    "DataError",
    "DataNotFoundError",
    "DatasetInfo",
    "FileImageDataset",
    "ImageDataset",
    "TensorImageDataset",
    "build_augmentation",
    "dataset_info",
    "eval_batches",
    "load_dataset",
    "pretrain_split",
    "read_split_csv",
    "select_labeled",
    "write_split_csv",
]
