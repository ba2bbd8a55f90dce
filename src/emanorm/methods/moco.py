"""MoCo v2 (He et al. 2020; Chen et al. 2020): a contrastive query/key pair with a key queue.

The query network is the student (backbone + 2-layer MLP head, no BN in the head); the key
network is the EMA teacher. As in the original MoCo, the teacher is updated inside
``training_step`` after the query forward and before the key forward. The keys of the global
batch are enqueued in ``after_step``, once the loss has been backpropagated: the loss of a step
always sees the queue as it was when the step began, and ``training_step`` never writes a buffer
that its own graph reads (which ``torch.compile`` cannot handle).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from emanorm.losses import info_nce
from emanorm.methods.base import ALL_NORMS, Method, Projected, check_range
from emanorm.methods.tensors import batch_get, concat_all_gather, log_values, output_spread
from emanorm.models import MLPHead
from emanorm.norms import is_distributed


class MoCo(Method):
    """MoCo v2 with an EMA key encoder (the teacher) and a queue of ``queue_size`` negatives."""

    name: ClassVar[str] = "moco"
    NORMS: ClassVar[tuple[str, ...]] = ALL_NORMS
    DEFAULT_NORM: ClassVar[str] = "shuffle_bn"
    OPTIONS: ClassVar[dict[str, Any]] = {
        "dim": 128,
        "queue_size": 65536,
        "temperature": 0.2,
        "symmetric": False,
        "num_splits": 8,
        "momentum_warmup": False,
        "exclude_bias_and_norm": False,
    }
    unlabeled_views: ClassVar[dict[str, str]] = {"view1": "moco", "view2": "moco"}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        o = self.options
        check_range("dim", o["dim"], 1)
        check_range("queue_size", o["queue_size"], 1)
        check_range("temperature", o["temperature"], 0.0, low_open=True)
        check_range("num_splits", o["num_splits"], 1)
        backbone = self.make_backbone()
        dim = backbone.feature_dim
        head = MLPHead(dim, dim, o["dim"], num_layers=2, batch_norm=False)
        self.student = self.prepare_student(Projected(backbone, head), heads=[head])
        self.teacher = self.make_teacher(self.student)
        # Keys are rows; MoCo's random unit-norm initial negatives.
        self.register_buffer("queue", F.normalize(torch.randn(o["queue_size"], o["dim"]), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def training_step(self, batch: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        view1 = batch_get(batch, "view1", self.name)
        view2 = batch_get(batch, "view2", self.name)
        symmetric = self.options["symmetric"]
        q1 = F.normalize(self.student(view1), dim=1)
        q2 = F.normalize(self.student(view2), dim=1) if symmetric else None
        # Original MoCo order: momentum update after the query forward, before the key forward;
        # once a real step (with gradient accumulation, on its first micro-batch only).
        if self.first_micro_batch(step):
            self.update_teacher(step)
        k2 = F.normalize(self.teacher_forward(view2), dim=1)
        k1 = F.normalize(self.teacher_forward(view1), dim=1) if symmetric else None
        temperature = self.options["temperature"]
        loss, acc = info_nce(q1, k2, self.queue, temperature)
        if symmetric:
            loss_21, acc_21 = info_nce(q2, k1, self.queue, temperature)
            loss, acc = (loss + loss_21) / 2, (acc + acc_21) / 2
        keys = torch.cat([k1, k2]) if symmetric else k2
        world = dist.get_world_size() if is_distributed() else 1
        self._check_queue_size(keys.shape[0] * world)  # fail at the first step, before its backward
        # every micro-batch's keys wait for after_step, the real step's end
        self.stash(step, keys=keys)
        return loss, log_values(
            loss=loss, acc=acc, momentum=self.current_momentum, output_std=output_spread(q1)
        )

    def calibration_inputs(self, batch: dict[str, Tensor]) -> list[Tensor]:
        """The query forwards: ``view1`` (and ``view2`` when symmetric)."""
        views = [batch_get(batch, "view1", self.name)]
        if self.options["symmetric"]:
            views.append(batch_get(batch, "view2", self.name))
        return views

    def after_step(self, step: int, total_steps: int) -> None:
        """Enqueue the keys of the step that was just backpropagated (every micro-batch's, in order:
        the queue then holds what one step on the whole batch would have put there).

        The teacher already moved inside ``training_step`` (MoCo's order), so unlike the base
        class this moves no weights.
        """
        keys = self.take_stash().get("keys")
        if keys:
            self.enqueue(torch.cat(keys) if len(keys) > 1 else keys[0])

    def check_batch_size(self, batch_size: int) -> None:
        super().check_batch_size(batch_size)
        world = dist.get_world_size() if is_distributed() else 1
        self._check_queue_size(batch_size * world * (2 if self.options["symmetric"] else 1))

    def _check_queue_size(self, batch: int) -> None:
        size = self.queue.shape[0]
        if size % batch:
            lower, upper = max(batch, size // batch * batch), (size // batch + 1) * batch
            raise ValueError(
                f"MoCo queue_size {size} must be a multiple of the global key batch {batch} "
                f"(e.g. {lower} or {upper})"
            )

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Put the keys of every rank into the queue (oldest keys out); the pointer wraps around."""
        keys = concat_all_gather(keys)
        size, batch = self.queue.shape[0], keys.shape[0]
        self._check_queue_size(batch)
        # Indices computed on the device: no synchronisation to read the pointer. The queue size is
        # a multiple of the key batch, so the slots never wrap inside one enqueue.
        slots = self.queue_ptr + torch.arange(batch, device=self.queue_ptr.device)
        self.queue.index_copy_(0, slots, keys.to(self.queue.dtype))
        self.queue_ptr.add_(batch).remainder_(size)

    def trainable_modules(self) -> list[nn.Module]:
        return [self.student]
