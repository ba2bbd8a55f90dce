"""BYOL (Grill et al. 2020): the online network regresses the EMA target's projection of the other view.

Online = backbone + projector + predictor; target = EMA teacher of backbone + projector. The
loss ``2 - 2 cos(p, z)`` is symmetrised over both view orders (summed, as in BYOL). The target
momentum follows BYOL's cosine schedule from ``momentum`` to 1 (:func:`emanorm.cosine_momentum`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from emanorm.losses import regression_loss
from emanorm.methods.base import ALL_NORMS, Method, check_range, cross_view_forwards
from emanorm.methods.tensors import batch_get, log_values, output_spread
from emanorm.models import MLPHead
from emanorm.teacher import cosine_momentum, warmup_momentum


class BYOL(Method):
    """BYOL with MLP projector and predictor (both ``hidden_dim`` wide, ``proj_dim`` out).

    ``momentum`` is the base of the cosine schedule (the paper: 0.98 at batch 512).
    """

    name: ClassVar[str] = "byol"
    NORMS: ClassVar[tuple[str, ...]] = ALL_NORMS
    DEFAULT_NORM: ClassVar[str] = "sync_bn"
    OPTIONS: ClassVar[dict[str, Any]] = {
        "hidden_dim": 4096,  # projector and predictor hidden width
        "proj_dim": 256,
        "num_splits": 8,
        "momentum_warmup": False,
        "exclude_bias_and_norm": True,  # BYOL with LARS: no decay / trust ratio for bias and norms
    }
    unlabeled_views: ClassVar[dict[str, str]] = {"view1": "byol1", "view2": "byol2"}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        o = self.options
        for key in ("hidden_dim", "proj_dim", "num_splits"):
            check_range(key, o[key], 1)
        backbone = self.make_backbone()
        projector = MLPHead(backbone.feature_dim, o["hidden_dim"], o["proj_dim"])
        predictor = MLPHead(o["proj_dim"], o["hidden_dim"], o["proj_dim"])
        self.build_predicting_student(backbone, projector, predictor)

    def training_step(self, batch: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        out = cross_view_forwards(batch, self.name, self.student, self.predictor, self.teacher_forward)
        loss = regression_loss(out.p1, out.t2) + regression_loss(out.p2, out.t1)
        return loss, log_values(loss=loss, output_std=output_spread(out.z1))

    def calibration_inputs(self, batch: dict[str, Tensor]) -> list[Tensor]:
        """One forward per view, as in training."""
        return [batch_get(batch, "view1", self.name), batch_get(batch, "view2", self.name)]

    def momentum_at(self, step: int, total_steps: int | None = None) -> float:
        """BYOL's cosine schedule from ``momentum`` to 1, optionally with Mean Teacher's warm-up."""
        if total_steps is None:
            raise ValueError("BYOL's cosine momentum needs total_steps")
        m = cosine_momentum(self.momentum, step, total_steps)
        if self.options["momentum_warmup"]:
            m = warmup_momentum(m, step)
        return m

    def trainable_modules(self) -> list[nn.Module]:
        return [self.student, self.predictor]
