"""The settings of the trained evaluation protocols (linear probe, fine-tuning), as one object each.

Every protocol function takes ``settings=`` and/or the same fields as keywords
(``linear_probe(..., lrs=(0.3,), epochs=5)``); keywords override the settings object.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, TypeVar

# torch-free (the command line shows these defaults in --help before torch loads)
from emanorm.catalog import DEFAULT_BACKBONE_LRS, DEFAULT_LINEAR_LRS

if TYPE_CHECKING:
    import torch

S = TypeVar("S", bound="ProbeSettings")


@dataclass(frozen=True)
class ProbeSettings:
    """What every trained protocol shares: SGD, a step schedule, the validation split for the lr search."""

    epochs: int = 50
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 0.0
    val_fraction: float = 0.1  # of the training labels, for the lr search (never the test set)
    seed: int = 0
    device: str | torch.device | None = None  # None: CUDA if available
    progress: bool = True

    @classmethod
    def resolve(cls: type[S], settings: S | None, overrides: dict[str, Any]) -> S:
        """``settings`` (default: this class's defaults) with the keyword ``overrides`` applied."""
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            allowed = ", ".join(f.name for f in fields(cls))
            raise TypeError(f"unknown {cls.__name__} field(s) {', '.join(unknown)}; allowed: {allowed}")
        return replace(settings if settings is not None else cls(), **overrides)


@dataclass(frozen=True)
class LinearSettings(ProbeSettings):
    """Linear probe on frozen features (``emanorm.evaluation.linear_probe``)."""

    lrs: Sequence[float] = DEFAULT_LINEAR_LRS


@dataclass(frozen=True)
class FinetuneSettings(ProbeSettings):
    """Fine-tuning backbone + a new classifier (``emanorm.evaluation.finetune``)."""

    backbone_lrs: Sequence[float] = DEFAULT_BACKBONE_LRS
    classifier_lr: float = 0.1
    amp: bool = False  # bf16 autocast on CUDA
