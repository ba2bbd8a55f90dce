"""Training methods: one small file per method on :class:`~emanorm.methods.base.Method`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from emanorm.methods.base import ALL_NORMS, TEACHER_NORMS, Method, NormPlan, Projected, plan_norm
from emanorm.methods.byol import BYOL
from emanorm.methods.dino import DINO
from emanorm.methods.fixmatch import FixMatch
from emanorm.methods.meanteacher import MeanTeacher
from emanorm.methods.moco import MoCo
from emanorm.methods.supervised import Supervised
from emanorm.models import Classifier

#: Method name -> class.
METHODS: dict[str, type[Method]] = {
    "moco": MoCo,
    "byol": BYOL,
    "dino": DINO,
    "fixmatch": FixMatch,
    "meanteacher": MeanTeacher,
    "supervised": Supervised,
}


def build_method(
    name: str,
    *,
    backbone_factory: Callable[[str], nn.Module],
    num_classes: int,
    norm: str,
    momentum: float,
    eman_momentum: float | None,
    bn_momentum: float,
    **options: Any,
) -> Method:
    """Build method ``name`` (a key of :data:`METHODS`) with the ``--norm`` plan ``norm``.

    ``backbone_factory(kind)`` returns a fresh backbone with norm layers ``kind`` (``bn``,
    ``sync_bn``, ``gn``, ``in``) and a ``feature_dim``. ``momentum`` is the teacher's parameter
    momentum (BYOL: the base of the cosine schedule), ``eman_momentum`` the EMAN statistics
    momentum (``None``: same as the parameters'), ``bn_momentum`` PyTorch's BN momentum.
    Unknown options or an invalid ``(name, norm)`` pair raise ``ValueError``.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")
    return METHODS[name](
        backbone_factory=backbone_factory, num_classes=num_classes, norm=norm, momentum=momentum,
        eman_momentum=eman_momentum, bn_momentum=bn_momentum, **options,
    )


__all__ = [
    "ALL_NORMS",
    "BYOL",
    "DINO",
    "METHODS",
    "TEACHER_NORMS",
    "Classifier",
    "FixMatch",
    "MeanTeacher",
    "Method",
    "MoCo",
    "NormPlan",
    "Projected",
    "Supervised",
    "build_method",
    "plan_norm",
]
