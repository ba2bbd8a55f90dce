"""DINO (Caron et al., ICCV 2021): self-distillation of an EMA teacher's centred, sharpened output.

Student and teacher are backbone + :class:`~emanorm.models.DINOHead`. The teacher sees the two
global crops, the student every crop (2 global + ``local_crops`` smaller local ones, one forward
per crop size, as DINO's multi-crop wrapper). The loss is the cross-entropy between the teacher's
softmax of ``(t - center) / teacher_temp`` on each global crop and the student's log-softmax of
``s / student_temp`` on every *other* crop, averaged over the pairs (DINO Eq. 1 and Algorithm 1).

- centring: ``center = m_c * center + (1 - m_c) * mean(t)`` with the mean over the global batch
  (all-reduced under DDP), applied after the step's loss has used the old centre;
- sharpening: the teacher temperature goes linearly from ``warmup_teacher_temp`` to
  ``teacher_temp`` over the first ``warmup_teacher_temp_epochs`` epochs, then stays;
- teacher momentum: cosine from ``momentum`` (0.996 in DINO) to 1 over the run, as BYOL;
- the last (weight-normalised) layer gets no gradient (``None``, as DINO's ``cancel_gradients_last_layer``:
  neither the optimiser's weight decay nor its state moves it) during the first
  ``freeze_last_layer_epochs`` epochs, and each parameter's gradient is clipped to norm
  ``clip_grad`` (DINO's per-parameter clipping). Both happen in :meth:`DINO.before_optimizer_step`,
  which the trainer calls once per real step on the all-reduced, accumulated, unscaled gradient
  (DINO's order), never inside backward.

Under gradient accumulation every micro-batch adds its teacher outputs' sum and count to the
step's :meth:`~emanorm.methods.base.Method.stash`, and the centre moves once, with the mean over
the whole batch.

Epochs come from the batch's ``"epoch"`` entry (:class:`~emanorm.data.BatchStream` adds it).
With a teacher norm (``eman``, ``teacher_pn``, ``student_pn``) the teacher's BatchNorm layers use
running statistics, exactly as for MoCo and BYOL.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from emanorm.catalog import METHOD_OPTION_RANGES
from emanorm.methods.base import ALL_NORMS, Method, Projected, check_range
from emanorm.methods.tensors import batch_get, cat_for_splits, log_values, split_from_splits
from emanorm.models import DINOHead
from emanorm.norms import is_distributed
from emanorm.teacher import cosine_momentum, warmup_momentum


def teacher_temperature(epoch: int, warmup: float, final: float, warmup_epochs: int) -> float:
    """DINO's schedule: ``linspace(warmup, final, warmup_epochs)`` over the first epochs, then ``final``."""
    if epoch >= warmup_epochs:
        return final
    if warmup_epochs == 1:
        return warmup
    return warmup + (final - warmup) * epoch / (warmup_epochs - 1)


@contextlib.contextmanager
def running_statistics_frozen(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers of ``module`` in training mode normalise with the batch as usual but leave
    their running statistics (and batch counters) untouched inside the block."""
    layers = [
        m for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats
    ]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32 when it is in a lower precision (autocast's bf16/fp16); float64 stays float64,
    so a float64 run (the reference comparisons) computes the loss and the centre in float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def dino_loss(student_out: list[Tensor], teacher_probs: list[Tensor], student_temp: float) -> Tensor:
    """Mean over (teacher global view i, student view v != i) of ``H(teacher_i, softmax(student_v / T_s))``.

    ``student_out`` lists the student's logits per view with the global views first, in the
    order of ``teacher_probs`` (the teacher's centred, sharpened softmax per global view).
    """
    log_probs = [F.log_softmax(at_least_float32(s) / student_temp, dim=-1) for s in student_out]
    total, terms = log_probs[0].new_zeros(()), 0
    for i, q in enumerate(teacher_probs):
        for v, log_p in enumerate(log_probs):
            if v == i:  # never the same crop
                continue
            total = total + torch.sum(-q * log_p, dim=-1).mean()
            terms += 1
    return total / terms


class DINO(Method):
    """DINO with a weight-normalised DINO head, centring, sharpening and multi-crop views."""

    name: ClassVar[str] = "dino"
    NORMS: ClassVar[tuple[str, ...]] = ALL_NORMS
    # DINO's code converts every BN of student and teacher to SyncBN (main_dino.py).
    DEFAULT_NORM: ClassVar[str] = "sync_bn"
    OPTIONS: ClassVar[dict[str, Any]] = {
        "out_dim": 65536,  # DINO's K (main_dino.py default)
        "hidden_dim": 2048,
        "bottleneck_dim": 256,
        "head_batch_norm": False,  # DINO's use_bn_in_head (default False)
        "norm_last_layer": True,
        "local_crops": 8,  # DINO's local_crops_number
        "student_temp": 0.1,
        "teacher_temp": 0.07,
        "warmup_teacher_temp": 0.04,
        "warmup_teacher_temp_epochs": 30,
        "center_momentum": 0.9,
        "freeze_last_layer_epochs": 1,
        "clip_grad": 3.0,  # per-parameter gradient norm; 0 turns clipping off
        # The local-crop forward also updates the student backbone's BN running statistics (as
        # DINO's code). Off by default: EMAN and student PN hand those statistics to a teacher
        # that only sees global crops, and the student is evaluated on full-size images.
        "local_crop_statistics": False,
        "num_splits": 8,
        "momentum_warmup": False,
        "exclude_bias_and_norm": True,  # no weight decay on biases and norm parameters
        # DINO's own rule (get_params_groups): no weight decay on any bias or 1-D parameter either
        "exclude_1d_params": False,
    }
    #: ``local_crops`` in [0, 64], ``center_momentum`` in [0, 1] (the catalog's table, torch-free).
    OPTION_RANGES: ClassVar[dict[str, tuple[float, float]]] = METHOD_OPTION_RANGES["dino"]
    #: Replaced per instance by the global and ``local_crops`` local views.
    unlabeled_views: ClassVar[dict[str, str]] = {"global1": "dino_global1", "global2": "dino_global2"}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        o = self.options
        for key in ("out_dim", "hidden_dim", "bottleneck_dim", "num_splits"):
            check_range(key, o[key], 1)
        for key in ("local_crops", "warmup_teacher_temp_epochs", "freeze_last_layer_epochs"):
            check_range(key, o[key], 0)
        for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            check_range(key, o[key], 0.0, low_open=True)
        for key, (low, high) in self.OPTION_RANGES.items():
            check_range(key, o[key], low, high)
        check_range("clip_grad", o["clip_grad"], 0.0)
        backbone = self.make_backbone()
        head = DINOHead(
            backbone.feature_dim, o["out_dim"], hidden_dim=o["hidden_dim"],
            bottleneck_dim=o["bottleneck_dim"], batch_norm=o["head_batch_norm"],
            norm_last_layer=o["norm_last_layer"],
        )
        self.student = self.prepare_student(Projected(backbone, head), heads=[head])
        self.teacher = self.make_teacher(self.student)
        self.unlabeled_views = {
            "global1": "dino_global1",
            "global2": "dino_global2",
            **{f"local{i + 1}": "dino_local" for i in range(o["local_crops"])},
        }
        self.register_buffer("center", torch.zeros(1, o["out_dim"]))
        self._freeze_last_layer = False
        self.current_teacher_temp = float("nan")

    # -- gradients -----------------------------------------------------------------------------
    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """DINO between backward and ``optimizer.step()``: clip each student gradient to norm
        ``clip_grad`` (``clip / (norm + 1e-6)`` when below 1, as DINO's ``clip_gradients``), then
        drop the last layer's gradient (``None``) while it is frozen."""
        params = [p for p in self.student.parameters() if p.grad is not None]
        clip = self.options["clip_grad"]
        if clip > 0 and params:
            grads = [p.grad for p in params]
            norms = torch._foreach_norm(grads)
            # multiplying by exactly 1.0 where DINO skips the multiplication changes no bit
            torch._foreach_mul_(grads, [torch.clamp(clip / (norm + 1e-6), max=1.0) for norm in norms])
        if self._freeze_last_layer:
            for p in self.student.head.last_layer.parameters():
                p.grad = None

    # -- the step ------------------------------------------------------------------------------
    def _student_outputs(self, globals_: list[Tensor], locals_: list[Tensor]) -> list[Tensor]:
        """One backbone forward per crop size, then one head forward over every crop (DINO's
        MultiCropWrapper); split BN sees each emulated GPU's share of every crop. Unless
        ``local_crop_statistics``, only the global crops move the backbone's running statistics."""
        splits = self.plan.num_splits
        features = []
        for group in (globals_, locals_):
            if not group:
                continue
            keep = group is locals_ and not self.options["local_crop_statistics"]
            with running_statistics_frozen(self.student.backbone) if keep else contextlib.nullcontext():
                out = self.student.backbone(cat_for_splits(group, splits))
            features += split_from_splits(out, [g.shape[0] for g in group], splits)
        out = self.student.head(cat_for_splits(features, splits))
        return split_from_splits(out, [f.shape[0] for f in features], splits)

    def training_step(self, batch: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        o = self.options
        epoch = int(batch_get(batch, "epoch", self.name))  # a CPU tensor (BatchStream): no device sync
        globals_ = [batch_get(batch, "global1", self.name), batch_get(batch, "global2", self.name)]
        locals_ = [batch_get(batch, f"local{i + 1}", self.name) for i in range(o["local_crops"])]
        self._freeze_last_layer = epoch < o["freeze_last_layer_epochs"]
        temp = teacher_temperature(
            epoch, o["warmup_teacher_temp"], o["teacher_temp"], o["warmup_teacher_temp_epochs"]
        )
        self.current_teacher_temp = temp
        student_out = self._student_outputs(globals_, locals_)
        teacher_out = at_least_float32(self.teacher_forward(torch.cat(globals_)))
        probs = F.softmax((teacher_out - self.center) / temp, dim=-1)
        loss = dino_loss(student_out, list(probs.chunk(2)), o["student_temp"])
        # every micro-batch's share of the centre's batch mean waits for after_step
        self.stash(step, center_sum=teacher_out.sum(0, keepdim=True), center_count=teacher_out.shape[0])
        # the targets' entropy as a fraction of ln K (1: uniform; the collapse alarm watches it)
        entropy = torch.special.entr(probs.detach()).sum(dim=-1).mean() / math.log(probs.shape[-1])
        return loss, log_values(loss=loss, teacher_temp=temp, target_entropy=entropy)

    def calibration_inputs(self, batch: dict[str, Tensor]) -> list[Tensor]:
        """The global crops (and the local ones with ``local_crop_statistics``), one forward per
        crop size as the backbone's in training; a BatchNorm head then sees these crops' features
        only (the default head has none)."""
        globals_ = [batch_get(batch, "global1", self.name), batch_get(batch, "global2", self.name)]
        inputs = [cat_for_splits(globals_, self.plan.num_splits)]
        if self.options["local_crop_statistics"] and self.options["local_crops"]:
            local = [batch_get(batch, f"local{i + 1}", self.name) for i in range(self.options["local_crops"])]
            inputs.append(cat_for_splits(local, self.plan.num_splits))
        return inputs

    def after_step(self, step: int, total_steps: int) -> None:
        """Move the teacher, then the centre with the teacher outputs of the step just taken (all
        its micro-batches')."""
        super().after_step(step, total_steps)
        stash = self.take_stash()
        if stash.get("center_sum"):
            sums = stash["center_sum"]
            total = sums[0] if len(sums) == 1 else torch.stack(sums).sum(0)
            self.update_center(total, sum(stash["center_count"]))

    @torch.no_grad()
    def update_center(self, output_sum: Tensor, count: int) -> None:
        """``center = m * center + (1 - m) * mean``, the mean over every rank's teacher outputs."""
        total = output_sum.clone()
        if is_distributed():
            dist.all_reduce(total)
            count *= dist.get_world_size()
        m = self.options["center_momentum"]
        self.center.mul_(m).add_(total.to(self.center.dtype) / count, alpha=1 - m)

    def momentum_at(self, step: int, total_steps: int) -> float:
        """DINO's cosine schedule from ``momentum`` to 1, optionally with Mean Teacher's warm-up."""
        m = cosine_momentum(self.momentum, step, total_steps)
        if self.options["momentum_warmup"]:
            m = warmup_momentum(m, step)
        return m

    def trainable_modules(self) -> list[nn.Module]:
        return [self.student]
