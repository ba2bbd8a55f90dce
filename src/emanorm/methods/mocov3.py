"""MoCo v3 (Chen, Xie, He, ICCV 2021): in-batch contrastive learning with a momentum encoder.

The student is backbone + projector (an MLP with BatchNorm after every layer, the last one
without affine parameters) followed by a predictor MLP; the teacher (MoCo v3's momentum encoder)
is an EMA of backbone + projector. The loss is symmetric: the student's prediction of each view
against the teacher's projection of the other view, with the other samples of the *global* batch
as negatives (every rank's keys gathered, the positive of this rank's query ``i`` at
``rank * batch + i``), a cross-entropy at temperature ``temperature`` multiplied by
``2 * temperature``. The teacher momentum follows a cosine from ``momentum`` to 1.

Normalization: MoCo v3 converts every BatchNorm (backbone, projector, predictor, momentum
encoder) to SyncBN, so ``--norm default`` is SyncBN under DDP and BN on one process, where
``bn_splits`` emulates per-GPU BN. ``eman``, ``teacher_pn`` and ``student_pn`` change only the
teacher's BatchNorm layers: for a BatchNorm-free backbone (a ViT: LayerNorm) that is the
projector's BatchNorm alone, so EMAN acts on the heads only.

Order of the teacher update: MoCo v3 moves the momentum encoder inside its forward, after the
query forward and before the key forward, with the momentum of that iteration. Here the teacher
moves in :meth:`MoCoV3.after_step`, right after the optimizer step, with the *next* step's
momentum: the teacher that sees step ``i + 1``'s keys is the same (``m_{i+1}`` towards the
weights after ``i + 1`` optimizer steps), the update of MoCo v3's step 0 is a no-op (teacher and
student are equal then) and the update after the last step has momentum 1.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch.distributed as dist
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from emanorm.losses import in_batch_info_nce
from emanorm.methods.base import Method, check_range, cross_view_forwards
from emanorm.methods.tensors import batch_get, concat_all_gather, log_values, output_spread
from emanorm.models import MLPHead
from emanorm.norms import is_distributed
from emanorm.teacher import cosine_momentum


def mocov3_mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, last_batch_norm: bool) -> MLPHead:
    """MoCo v3's MLP: Linear (no bias) - BN - ReLU per hidden layer, a Linear without bias to
    ``out_dim``, then (``last_batch_norm``) a BatchNorm without affine parameters."""
    return MLPHead(in_dim, hidden_dim, out_dim, num_layers=num_layers, batch_norm=True,
                   last_batch_norm=last_batch_norm, last_affine=False, last_bias=False)


def freeze_patch_projection(backbone: nn.Module) -> int:
    """Stop the gradient of a ViT's patch projection (MoCo v3's ``--stop-grad-conv1``): it stays
    at its random initialisation. Returns the number of tensors frozen; ``ValueError`` when the
    backbone has no timm (``patch_embed.proj``) or torchvision (``conv_proj``) patch projection."""
    projection = getattr(getattr(backbone, "patch_embed", None), "proj", None)
    if projection is None:
        projection = getattr(backbone, "conv_proj", None)
    if not isinstance(projection, nn.Module) or not list(projection.parameters()):
        raise ValueError(
            "freeze_patch_embed needs a ViT backbone with a patch projection "
            "(timm: patch_embed.proj, torchvision: conv_proj), e.g. timm:vit_small_patch16_224"
        )
    params = list(projection.parameters())
    for p in params:
        p.requires_grad_(False)
    return len(params)


def zero_init_residual_(backbone: nn.Module) -> int:
    """Zero the last BN scale of every torchvision residual block (``zero_init_residual=True``,
    which MoCo v3's ResNet uses). Returns the number of blocks changed."""
    count = 0
    for block in backbone.modules():
        if isinstance(block, Bottleneck | BasicBlock):
            last = block.bn3 if isinstance(block, Bottleneck) else block.bn2
        else:
            continue
        if getattr(last, "weight", None) is not None:
            nn.init.zeros_(last.weight)
            count += 1
    return count


class MoCoV3(Method):
    """MoCo v3: symmetric in-batch InfoNCE between predictor and momentum-encoder projections.

    ``momentum`` is the base of the cosine schedule (MoCo v3: 0.99; 0.996 for its 1000-epoch
    ResNet recipe). Defaults follow the paper (3-layer projector, BN after the predictor's output
    too, as MoCo v3's ViT); the ResNet-50 code uses ``projector_layers=2`` and
    ``predictor_last_batch_norm=False`` (preset ``imagenet-mocov3``).
    """

    name: ClassVar[str] = "mocov3"
    NORMS: ClassVar[tuple[str, ...]] = ("default", "bn", "sync_bn", "eman", "teacher_pn", "student_pn")
    #: MoCo v3 converts every BatchNorm to SyncBN (main_moco.py); on one process that is plain BN.
    DEFAULT_NORM: ClassVar[str] = "sync_bn"
    OPTIONS: ClassVar[dict[str, Any]] = {
        "dim": 256,  # main_moco.py --moco-dim
        "hidden_dim": 4096,  # --moco-mlp-dim
        "temperature": 1.0,  # --moco-t (0.2 in the ViT recipes)
        "projector_layers": 3,
        "predictor_layers": 2,
        "predictor_last_batch_norm": True,
        "cosine_momentum": True,  # --moco-m-cos (every published recipe sets it)
        "freeze_patch_embed": False,  # --stop-grad-conv1 (ViT recipes)
        "zero_init_residual": False,  # torchvision ResNet's zero_init_residual (ResNet recipes)
        # LARS (ResNet recipes) gives no weight decay / trust ratio to 1-d tensors (bias, norm);
        # the ViT recipes' AdamW decays every parameter (set false there).
        "exclude_bias_and_norm": True,
    }
    unlabeled_views: ClassVar[dict[str, str]] = {"view1": "byol1", "view2": "byol2"}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        o = self.options
        for key in ("dim", "hidden_dim", "projector_layers", "predictor_layers"):
            check_range(key, o[key], 1)
        check_range("temperature", o["temperature"], 0.0, low_open=True)
        backbone = self.make_backbone()
        if o["freeze_patch_embed"]:
            freeze_patch_projection(backbone)
        if o["zero_init_residual"] and not zero_init_residual_(backbone):
            raise ValueError("zero_init_residual needs a torchvision ResNet backbone, e.g. resnet50")
        projector = mocov3_mlp(
            backbone.feature_dim, o["hidden_dim"], o["dim"], o["projector_layers"], last_batch_norm=True
        )
        predictor = mocov3_mlp(o["dim"], o["hidden_dim"], o["dim"], o["predictor_layers"],
                               o["predictor_last_batch_norm"])
        self.build_predicting_student(backbone, projector, predictor)
        self.current_momentum = self.momentum_at(0, 1)

    def default_norm(self) -> str:
        """SyncBN under DDP (MoCo v3's code), plain BN on one process (so ``bn_splits`` applies)."""
        return "sync_bn" if is_distributed() else "bn"

    def contrastive_loss(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's queries against the keys of every rank (positives offset by the rank)."""
        keys = concat_all_gather(k)
        offset = dist.get_rank() * q.shape[0] if is_distributed() else 0
        return in_batch_info_nce(q, keys, self.options["temperature"], offset)

    def training_step(self, batch: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        out = cross_view_forwards(batch, self.name, self.student, self.predictor, self.teacher_forward)
        loss_12, acc_12 = self.contrastive_loss(out.p1, out.t2)
        loss_21, acc_21 = self.contrastive_loss(out.p2, out.t1)
        loss = loss_12 + loss_21
        return loss, log_values(
            loss=loss,
            acc=(acc_12 + acc_21) / 2,
            momentum=self.current_momentum,
            output_std=output_spread(out.z1),
        )

    def calibration_inputs(self, batch: dict[str, Tensor]) -> list[Tensor]:
        """One forward per view, as in training."""
        return [batch_get(batch, "view1", self.name), batch_get(batch, "view2", self.name)]

    def after_step(self, step: int, total_steps: int) -> None:
        """Move the teacher with the momentum of the next step (see the module docstring)."""
        assert self.teacher is not None
        m = self.momentum_at(step + 1, total_steps)
        self.teacher.update(self.teacher_source(), m)
        self.current_momentum = m

    def momentum_at(self, step: int, total_steps: int | None = None) -> float:
        """MoCo v3's schedule: cosine from ``momentum`` to 1 over the run (or constant)."""
        if not self.options["cosine_momentum"]:
            return self.momentum
        if total_steps is None:
            raise ValueError("MoCo v3's cosine momentum needs total_steps")
        return cosine_momentum(self.momentum, step, total_steps)

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """The base groups, with MoCo v3's LARS trust ratio ``eta * ||w|| / ||g + wd * w||``
        (read by :class:`emanorm.optim.LARS` only; other optimisers ignore the key)."""
        return [{**group, "trust_of_update": True} for group in super().parameter_groups(weight_decay)]

    def trainable_modules(self) -> list[nn.Module]:
        return [self.student, self.predictor]
