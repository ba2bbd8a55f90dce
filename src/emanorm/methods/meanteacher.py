"""Mean Teacher (Tarvainen & Valpola 2017): the EMA-teacher framework the paper starts from.

The student classifies ``cat(x, u_w)`` in one forward; the EMA teacher classifies a second weak
view ``u_w2``. Loss = CE on the labeled part + ``w(step)`` x MSE between the student's and the
teacher's class probabilities on the unlabeled part, where ``w`` ramps up with
``exp(-5 (1 - t)^2)`` over ``rampup_steps`` to ``consistency``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from emanorm.losses import accuracy, softmax_mse
from emanorm.methods.base import ALL_NORMS, Method, check_range
from emanorm.methods.tensors import batch_get, cat_for_splits, defined_mean, log_values, unlabeled_targets
from emanorm.models import Classifier


def sigmoid_rampup(step: int, rampup_steps: int) -> float:
    """Mean Teacher's ramp-up ``exp(-5 (1 - t)^2)``, ``t = step / rampup_steps`` clipped to [0, 1]."""
    if rampup_steps <= 0:
        return 1.0
    t = min(max(step / rampup_steps, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


class MeanTeacher(Method):
    """Mean Teacher with a softmax-MSE consistency on unlabeled weak views."""

    name: ClassVar[str] = "meanteacher"
    semi_supervised: ClassVar[bool] = True
    NORMS: ClassVar[tuple[str, ...]] = ALL_NORMS
    DEFAULT_NORM: ClassVar[str] = "bn"
    OPTIONS: ClassVar[dict[str, Any]] = {
        "consistency": 100.0,
        "rampup_steps": 1000,
        "num_splits": 8,
        "momentum_warmup": False,
        "exclude_bias_and_norm": False,
    }
    labeled_views: ClassVar[dict[str, str]] = {"x": "weak"}
    unlabeled_views: ClassVar[dict[str, str]] = {"u_w": "weak", "u_w2": "weak"}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_range("consistency", self.options["consistency"], 0.0)
        check_range("rampup_steps", self.options["rampup_steps"], 0)
        check_range("num_splits", self.options["num_splits"], 1)
        self.student = self.prepare_student(Classifier(self.make_backbone(), self.num_classes))
        self.teacher = self.make_teacher(self.student)

    def consistency_weight(self, step: int) -> float:
        """The consistency weight at ``step``."""
        return self.options["consistency"] * sigmoid_rampup(step, self.options["rampup_steps"])

    def training_step(self, batch: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        x = batch_get(batch, "x", self.name)
        y = batch_get(batch, "y", self.name)
        u_w = batch_get(batch, "u_w", self.name)
        u_w2 = batch_get(batch, "u_w2", self.name)
        logits_x, logits_u = self.student_forward([x, u_w])
        logits_t = self.teacher_forward(u_w2)
        loss_x = F.cross_entropy(logits_x, y)
        loss_c = softmax_mse(logits_u, logits_t)
        weight = self.consistency_weight(step)
        loss = loss_x + weight * loss_c
        values: dict[str, Tensor | float] = {
            "loss": loss, "loss_x": loss_x, "loss_c": loss_c, "weight_c": weight,
            "acc_x": accuracy(logits_x, y),
        }
        u_y = unlabeled_targets(batch)
        if u_y is not None:
            correct = (logits_t.argmax(dim=1) == u_y).float()
            # NaN (not logged) without known targets in this batch
            values["teacher_acc_u"] = defined_mean(correct, (u_y >= 0).float())
        return loss, log_values(**values)

    def calibration_inputs(self, batch: dict[str, Tensor]) -> list[Tensor]:
        """The student's one forward over labeled and unlabeled views."""
        parts = [batch_get(batch, "x", self.name), batch_get(batch, "u_w", self.name)]
        return [cat_for_splits(parts, self.plan.num_splits)]

    def classifier(self, which: str = "teacher") -> nn.Module:
        super().classifier(which)
        return self.teacher.module if which == "teacher" else self.student
