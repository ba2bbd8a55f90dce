"""Supervised baseline: cross-entropy on the weak views of the labeled images only.

There is no teacher: ``encoder("teacher")`` and ``classifier("teacher")`` return the student,
so evaluation code can ask every method for its teacher.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from emanorm.losses import accuracy
from emanorm.methods.base import Method, check_range
from emanorm.methods.tensors import batch_get, log_values
from emanorm.models import Classifier


class Supervised(Method):
    """A backbone + linear classifier trained with (optionally label-smoothed) cross-entropy."""

    name: ClassVar[str] = "supervised"
    semi_supervised: ClassVar[bool] = True
    NORMS: ClassVar[tuple[str, ...]] = ("default", "bn", "sync_bn", "gn", "in")
    DEFAULT_NORM: ClassVar[str] = "bn"
    OPTIONS: ClassVar[dict[str, Any]] = {"label_smoothing": 0.0, "exclude_bias_and_norm": False}
    labeled_views: ClassVar[dict[str, str]] = {"x": "weak"}
    unlabeled_views: ClassVar[dict[str, str]] = {}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_range("label_smoothing", self.options["label_smoothing"], 0.0, 1.0)
        self.student = self.prepare_student(Classifier(self.make_backbone(), self.num_classes))

    def training_step(self, batch: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        x = batch_get(batch, "x", self.name)
        y = batch_get(batch, "y", self.name)
        logits = self.student(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.options["label_smoothing"])
        return loss, log_values(loss=loss, acc_x=accuracy(logits, y))

    def calibration_inputs(self, batch: dict[str, Tensor]) -> list[Tensor]:
        """The labeled view (there is no teacher: this only sets the student's statistics)."""
        return [batch_get(batch, "x", self.name)]

    def classifier(self, which: str = "teacher") -> nn.Module:
        """The student for both ``which`` values (there is no teacher)."""
        super().classifier(which)
        return self.student
