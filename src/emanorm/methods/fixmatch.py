"""FixMatch (Sohn et al. 2020) in its two forms.

* ``norm="default"`` (the original): no teacher. One forward of the student over
  ``cat(x, u_w, u_s)``; the pseudo-labels come from the same forward's (detached) weak logits,
  so they share BN statistics with the strong view. ``eval_ema`` keeps an EMAN-mode EMA copy
  of the student for evaluation only (the original FixMatch evaluates an EMA model).
* any other norm (the paper's Figure 2): an EMA teacher labels the weak view ``u_w``; the
  student forwards ``cat(x, u_s)``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from emanorm.losses import accuracy, pseudo_label_loss
from emanorm.methods.base import ALL_NORMS, Method, check_choice, check_range
from emanorm.methods.tensors import (
    batch_get,
    cat_for_splits,
    concat_all_gather,
    defined_mean,
    log_values,
    unlabeled_targets,
)
from emanorm.models import Classifier
from emanorm.teacher import EMATeacher

DISTRIBUTIONS = ("none", "align")


class FixMatch(Method):
    """FixMatch: cross-entropy on labeled ``x`` + ``lambda_u`` x confident pseudo-label CE on ``u_s``."""

    name: ClassVar[str] = "fixmatch"
    semi_supervised: ClassVar[bool] = True
    NORMS: ClassVar[tuple[str, ...]] = ALL_NORMS
    DEFAULT_NORM: ClassVar[str] = "default"
    OPTIONS: ClassVar[dict[str, Any]] = {
        "threshold": 0.95,
        "lambda_u": 1.0,
        "temperature": 1.0,
        "distribution": "none",
        "distribution_momentum": 0.999,
        "eval_ema": True,
        "num_splits": 8,
        "momentum_warmup": False,
        "exclude_bias_and_norm": False,
    }
    labeled_views: ClassVar[dict[str, str]] = {"x": "weak"}
    unlabeled_views: ClassVar[dict[str, str]] = {"u_w": "weak", "u_s": "strong"}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        o = self.options
        check_range("threshold", o["threshold"], 0.0, 1.0)
        check_range("lambda_u", o["lambda_u"], 0.0)
        check_range("temperature", o["temperature"], 0.0, low_open=True)
        check_range("distribution_momentum", o["distribution_momentum"], 0.0, 1.0)
        check_range("num_splits", o["num_splits"], 1)
        check_choice("distribution", o["distribution"], DISTRIBUTIONS)
        self.student = self.prepare_student(Classifier(self.make_backbone(), self.num_classes))
        self.teacher = self.make_teacher(self.student) if self.plan.teacher_mode is not None else None
        # Evaluation-only EMA of the default form: EMAN mode, so its BN statistics are averaged too.
        self.eval_ema: EMATeacher | None = None
        if self.teacher is None and o["eval_ema"]:
            self.eval_ema = self.make_teacher(self.student, mode="eman")
        if o["distribution"] == "align":
            # Running mean of the model's class distribution on unlabeled data (ReMixMatch).
            self.register_buffer("class_prior", torch.full((self.num_classes,), 1.0 / self.num_classes))

    @property
    def default_form(self) -> bool:
        """True for the original FixMatch (no teacher for pseudo-labels)."""
        return self.teacher is None

    def training_step(self, batch: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        x = batch_get(batch, "x", self.name)
        y = batch_get(batch, "y", self.name)
        u_w = batch_get(batch, "u_w", self.name)
        u_s = batch_get(batch, "u_s", self.name)
        if self.default_form:
            logits_x, logits_w, logits_s = self.student_forward([x, u_w, u_s])
            logits_w = logits_w.detach()
        else:
            logits_x, logits_s = self.student_forward([x, u_s])
            logits_w = self.teacher_forward(u_w)
        probs = self.pseudo_label_probs(logits_w)
        confidence, pseudo = probs.max(dim=1)
        mask = (confidence >= self.options["threshold"]).float()
        loss_x = F.cross_entropy(logits_x, y)
        loss_u = pseudo_label_loss(logits_s, pseudo, mask)
        loss = loss_x + self.options["lambda_u"] * loss_u
        values: dict[str, Tensor] = {
            "loss": loss, "loss_x": loss_x, "loss_u": loss_u, "mask": mask.mean(),
            "acc_x": accuracy(logits_x, y),
        }
        u_y = unlabeled_targets(batch)
        if u_y is not None:
            # Undefined without known targets (or without confident known samples): NaN, not logged.
            correct, known = (pseudo == u_y).float(), (u_y >= 0).float()
            values["pl_acc"] = defined_mean(correct, known)
            values["pl_precision"] = defined_mean(correct, known * mask)
        logs = log_values(**values)
        return loss, logs

    def calibration_inputs(self, batch: dict[str, Tensor]) -> list[Tensor]:
        """The student's one forward: labeled and strong views (and weak ones in the default form)."""
        parts = [batch_get(batch, "x", self.name)]
        if self.default_form:
            parts.append(batch_get(batch, "u_w", self.name))
        parts.append(batch_get(batch, "u_s", self.name))
        return [cat_for_splits(parts, self.plan.num_splits)]

    def ema_copies(self) -> list[EMATeacher]:
        """The teacher, or the default form's evaluation-only ``eval_ema``."""
        return [m for m in (self.teacher, self.eval_ema) if m is not None]

    @torch.no_grad()
    def pseudo_label_probs(self, logits_w: Tensor) -> Tensor:
        """Class probabilities of the weak view, sharpened by ``temperature``, optionally aligned."""
        probs = torch.softmax(logits_w.detach().float() / self.options["temperature"], dim=1)
        if self.options["distribution"] == "align":
            # Distribution alignment towards a uniform prior (ReMixMatch), over the global batch so
            # that every rank keeps the same running mean.
            prior = self.class_prior
            prior.lerp_(concat_all_gather(probs).mean(dim=0), 1.0 - self.options["distribution_momentum"])
            probs = probs / prior
            probs = probs / probs.sum(dim=1, keepdim=True)
        return probs

    def after_step(self, step: int, total_steps: int) -> None:
        if self.teacher is not None:
            self.update_teacher(step, total_steps)
        elif self.eval_ema is not None:
            m = self.momentum_at(step, total_steps)
            self.eval_ema.update(self.student, m)
            self.current_momentum = m

    def encoder(self, which: str = "teacher") -> nn.Module:
        """The backbone of :meth:`classifier` ``(which)``."""
        return self.classifier(which).backbone

    def classifier(self, which: str = "teacher") -> nn.Module:
        """``"teacher"``: the EMA teacher, or the default form's ``eval_ema`` copy, or (neither) the
        student itself; ``"student"``: the student."""
        super().classifier(which)
        if which == "teacher":
            if self.teacher is not None:
                return self.teacher.module
            if self.eval_ema is not None:
                return self.eval_ema.module
        return self.student
